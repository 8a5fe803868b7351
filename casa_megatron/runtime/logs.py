"""Logging for ``casa-train``: one format with time, level and rank; known start-up noise off.

Rank 0 logs at the configured level (``CASA_LOG_LEVEL``, default INFO); other ranks log
warnings and errors only, so a 512-rank job does not print every line 512 times. INFO and DEBUG
go to stdout (where the step lines are), warnings and errors to stderr.

Start-up noise filtered (each one checked to be non-actionable here):
  * megatron-core's "Transformer Engine and Apex are not installed ... Falling back" and
    "Apex is not installed. Falling back to Torch Norm": on a CPU machine there is nothing to
    install. Kept on a GPU machine, where a missing Transformer Engine is worth knowing.
  * megatron's deprecation of the ``cuda_graph_scope`` default ("full scope is deprecated"),
    which it raises from its own default value, and torch's FutureWarnings for
    ``reduce_scatter_tensor`` / ``all_gather_into_tensor``, which megatron calls.
  * torch's "``.grad`` of a non-leaf Tensor" warning raised through ``compat/cpu.py``'s
    function mode (megatron reads ``.grad`` of views while building its buffers).
  * megatron's "Implicit initialization of Rerun State Machine" prints (rerun mode is off).
  * MLflow's INFO chatter at start (database creation/migration, system-metrics monitor) and
    megatron-core's INFO records (every DDP / optimizer config field, every parameter name);
    ``CASA_LOG_LEVEL=DEBUG`` shows them all.
Everything else (including megatron's other warnings) still shows.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

NOISY_WARNINGS = [  # (message regex, category) filtered everywhere
    (r"full scope is deprecated", UserWarning),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),  # megatron's dist_checkpointing
]
CPU_ONLY_WARNINGS = [  # filtered only without a GPU, where nothing can be installed to act on them
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
]
QUIET_LOGGERS = {  # logger -> level below which its records are dropped (unless CASA_LOG_LEVEL=DEBUG)
    "megatron": logging.WARNING,  # INFO: every DDP / optimizer config field and parameter name
    "mlflow.store.db.utils": logging.WARNING,
    "mlflow.system_metrics.system_metrics_monitor": logging.WARNING,
    "megatron.core.rerun_state_machine": logging.ERROR,  # "initialized in mode DISABLED"
    "alembic": logging.WARNING,
    "megatron.core.optimizer_param_scheduler": logging.WARNING,  # "> overriding learning rate value..."
}


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def filter_startup_warnings(on_gpu: bool | None = None) -> None:
    """Install the warning filters (call before importing megatron-core)."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    for message, category in NOISY_WARNINGS + ([] if on_gpu else CPU_ONLY_WARNINGS):
        warnings.filterwarnings("ignore", message=message, category=category)


_STATE = {"configured": False, "level": logging.INFO}


def promote_rank(verbose: bool) -> None:
    """Let this rank log at the configured level (the metrics rank: last pipeline stage, which
    is not rank 0 under pipeline parallelism). No-op unless ``setup_logging`` ran."""
    if _STATE["configured"]:
        logging.getLogger().setLevel(_STATE["level"] if verbose else max(logging.WARNING, _STATE["level"]))


def setup_logging(rank: int = 0, level: str | None = None) -> None:
    """Configure the root logger once per process (later calls update the rank and level)."""
    level = (level or os.environ.get("CASA_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(level)
    if not isinstance(numeric, int):
        raise ValueError(f"CASA_LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    formatter = logging.Formatter(FORMAT.format(rank=rank), DATE_FORMAT)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_casa", False)]:
        root.removeHandler(handler)
    for handler in (out, err):
        handler.setFormatter(formatter)
        handler._casa = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    _STATE.update(configured=True, level=numeric)
    promote_rank(rank == 0)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else max(quiet, numeric))

"""Start a run from an imported checkpoint (``checkpoint.pretrained=DIR``): weights only.

The optimizer, scheduler and data order start fresh; a checkpoint to resume from in
``checkpoint.dir`` takes precedence (a restarted job continues its own run instead of going
back to the pretrained weights). The weights are a megatron dist checkpoint written at TP=1,
PP=1 by ``casa-convert import-hf``; megatron reshards them to this run's TP/PP on load, and
casts them to the run's parameter dtype. The architecture was already taken from the
checkpoint's ``architecture.yaml`` when the config was loaded (config/pretrained.py).
Weights are loaded before the optimizer is built, so its (fp32 main) copies start from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron.core import dist_checkpointing

from casa_megatron.config.pretrained import WEIGHTS_DIR
from casa_megatron.training import checkpoint as checkpointing
from casa_megatron.training.checkpoint import CheckpointError


def save_model_weights(model, directory: str | Path) -> None:
    """The model's weights only (no optimizer), in megatron's reshardable dist format."""
    checkpointing._use_in_process_results_queue()
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory))


def load_model_weights(model, directory: str | Path) -> None:
    path = Path(directory) / WEIGHTS_DIR
    if not (path / "metadata.json").exists():
        raise CheckpointError(f"{path}: no imported weights (expected a dist checkpoint written by "
                              "`casa-convert import-hf`)")
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    except (KeyError, ValueError, RuntimeError, AssertionError) as exc:  # mismatched keys / shapes
        raise CheckpointError(f"imported weights {path} do not fit this model: {exc!r}") from exc
    model.load_state_dict(state["model"])


def start_from_pretrained(model, cfg, run_dir: Path) -> Optional[str]:
    """Load ``checkpoint.pretrained`` into ``model`` unless the run will resume; returns the
    directory loaded (for the tracker) or None."""
    directory = cfg.checkpoint.pretrained
    if not directory:
        return None
    if cfg.checkpoint.resume and checkpointing.Checkpointer(
            cfg.checkpoint.dir or run_dir / "checkpoints").latest() is not None:
        return None
    load_model_weights(model, directory)
    return str(directory)

"""Resumable distributed checkpoints with megatron ``dist_checkpointing``.

Layout of ``<dir>``::

    iter_0000100/          one complete checkpoint (model + optimizer shards, torch_dist format)
      trainer.pt           step, scheduler, parallel layout          (rank 0)
      rank_00003.pt        RNG states and data-iterator position     (every rank)
      config.yaml          the resolved config of the run
      chat_template.jinja  the text of data.chat_template, when set (config/run_files.py)
      tokenizer/           the run's tokenizer files (checkpoint.save_tokenizer)
      manifest.json        every file's size and CRC-32, written last (ckpt_manifest.py)
    iter_0000200.damaged/  a checkpoint that failed its manifest check, set aside (never deleted)
    latest                 name of the newest complete checkpoint (replaced atomically)

A save writes ``iter_N.tmp/``, then the manifest, and renames it only after every rank
finished, then updates ``latest``: a save killed half-way leaves the previous checkpoint and
pointer untouched (the stale ``.tmp`` is removed by the next save). With ``async_save`` the
model and optimizer shards are written in the background and the same commit runs once every
rank's writer finished (``checkpoint_async.py``). ``latest`` is a convenience
for people and tools; resuming trusts the directories: the newest ``iter_N`` whose manifest
checks out (``candidates()`` + ``verify()``). Model and optimizer are saved in megatron's
reshardable formats, so a checkpoint loads at another TP/PP layout (with the optimizer saved
``dp_reshardable``: at another DP size only; ``resume.check_optimizer_layout``).

Why saves were slow (184 s first save on CPU): megatron's writer creates its results queue
with ``multiprocessing.get_context("spawn").Manager()``, i.e. a fresh interpreter that
re-imports the training script, torch and megatron before it answers. We hand it a queue per
save instead (``checkpoint_async.results_queue``): the first save now takes ~0.2 s for the
tiny model.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from casa_megatron.config.run_files import save_run_config
from casa_megatron.config.schema import OPTIMIZER_FORMATS
from casa_megatron.parallel.rank0 import on_rank0
from casa_megatron.runtime.atomic import atomic_write_text
from casa_megatron.training import param_groups_compat
from casa_megatron.training.checkpoint_async import BackgroundWrites, results_queue
from casa_megatron.training.ckpt_manifest import check_files, read_manifest, write_manifest

CHECKPOINT_NAME = re.compile(r"^iter_(\d+)$")
logger = logging.getLogger(__name__)


def _data_states_by_dp_rank(path: Path) -> dict:
    """{old dp rank: its data-loader state}, read once by rank 0 from the ``rank_*.pt`` files
    (ranks of one data-parallel replica hold the same position) and broadcast."""
    def read() -> dict:
        states = {}
        for rank_file in sorted(path.glob("rank_*.pt")):
            extras = torch.load(rank_file, weights_only=False)
            states.setdefault(int(extras["dp_rank"]), extras["data"])
        return states

    return on_rank0(read, share=True)


def saved_sharding(path: Path) -> dict:
    """The optimizer format a checkpoint was written in (its megatron content metadata)."""
    saved = dist_checkpointing.load_content_metadata(str(path)) or {}
    return {"distrib_optim_sharding_type": saved.get("distrib_optim_sharding_type", "fully_reshardable")}


def read_tensors(path: Path) -> dict:
    """Every tensor of a dist checkpoint (model weights, the optimizer's fp32 weights and Adam
    moments), read in this one process without torch.distributed: for comparing two
    checkpoints (tests, ``benchmarks/checkpoint_save.py``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as load_dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    reader = FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if hasattr(m, "size") and "_extra_state" not in k}
    load_dcp(tensors, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return tensors


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, incomplete, other model)."""


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _prepare_optimizer_for_load(optimizer) -> None:
    """Two gaps of megatron 0.16's distributed optimizer with torch's AdamW (no Apex/TE):

    * it describes its state only once Adam's moments exist, so a fresh optimizer first gets
      placeholder moments (megatron's own helper) that the load then replaces;
    * the ``fully_reshardable`` format keeps Adam's ``step`` in the param groups (restored
      first), but the per-parameter restore also asks for a per-tensor ``step``; we hand it the
      value already restored.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        if not inner.state:
            opt._init_optimizer_states_with_dummy_values()
        original = type(opt)._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return _original(_opt, model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


def _adam_steps_per_parameter(optimizer) -> None:
    """megatron restores Adam's ``step`` once per param group (its fused Adams keep it there):
    ``dp_reshardable`` puts it only in the group, leaving every parameter's ``state["step"]`` at
    the placeholder's 1 (measured: resumed at step 3, Adam's bias correction restarted and the
    losses drifted from step 7 on); ``fully_reshardable`` hands each parameter ONE tensor shared
    by all. torch's AdamW keeps and increments ``state["step"]`` per parameter, in place, so
    each parameter gets its own tensor holding the group's restored step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in (inner.param_groups if inner is not None else []):
            for param in group["params"]:
                state = inner.state.get(param, {})
                step = state.get("step")
                if torch.is_tensor(step):
                    restored = group.get("step", step)
                    state["step"] = torch.as_tensor(restored, dtype=step.dtype, device=step.device).clone()


_SCHEDULED = ("params", "step", "lr", "weight_decay")  # restored state / set by the scheduler


def _configured_hyperparameters(optimizer) -> List[dict]:
    """The param groups' config-derived settings (peak / min LR, betas, eps...) before a load."""
    return [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in optimizer.param_groups]


def _restore_hyperparameters(optimizer, configured: List[dict]) -> None:
    """megatron's optimizer load replaces whole param groups, so a peak LR changed on resume
    was silently ignored (and ``current_lrs`` logged 0, matching no group). The config wins, as
    with megatron's ``override_opt_param_scheduler``; Adam's step and the moments stay restored."""
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 2, verify: str = "checksum",
                 async_save: bool = False, optimizer_format: str = "fully_reshardable"):
        if optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(f"optimizer_format={optimizer_format!r} not in {OPTIMIZER_FORMATS}")
        self.sharding = {"distrib_optim_sharding_type": optimizer_format}
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.checksums = verify == "checksum"
        self.background = BackgroundWrites() if async_save else None
        self.held_s = 0.0  # seconds saves and background commits held the training loop, in all
        self.last_save_held_s = 0.0

    # --- finding ----------------------------------------------------------------------------
    def candidates(self) -> List[Path]:
        """Finished checkpoint directories (``iter_N``, not ``.tmp`` / set aside), newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    def pointer(self) -> Optional[str]:
        """The name ``latest`` holds (None if there is no pointer)."""
        try:
            return (self.dir / "latest").read_text().strip() or None
        except FileNotFoundError:
            return None

    def latest(self) -> Optional[Path]:
        """The newest finished checkpoint directory (not verified: see ``verify``)."""
        found = self.candidates()
        return found[0] if found else None

    def verify(self, path: Path) -> Optional[str]:
        """Collective. None if ``path`` is complete and intact, else what is wrong (naming the file).
        A checkpoint written before manifests existed is accepted when its ``trainer.pt`` is there."""
        try:
            legacy = read_manifest(path) is None and (path / "trainer.pt").exists()
        except ValueError:
            legacy = False
        if legacy:
            logger.warning("checkpoint %s has no manifest (written by an older version): not verified", path)
            return None
        return check_files(path, self.checksums)

    def set_aside(self, path: Path, reason: str) -> Optional[Path]:
        """Rank 0: rename a checkpoint that cannot be used to ``<name>.<reason>[-k]`` (never delete)."""
        if dist.get_rank() != 0 or not path.exists():
            return None
        target = path.with_name(f"{path.name}.{reason}")
        k = 1
        while target.exists():
            k += 1
            target = path.with_name(f"{path.name}.{reason}-{k}")
        try:
            os.replace(path, target)
        except OSError as exc:
            logger.warning("could not set aside %s (%s); it stays where it is", path, exc)
            return None
        logger.warning("kept %s as %s", path.name, target.name)
        return target

    def check_writable(self) -> None:
        """Rank 0, before step 1: the directory can be created and written (a probe file), so an
        unwritable or missing mount fails now, not at the first save hours later."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(f"checkpoint dir {self.dir} is not writable: {exc.strerror or exc}") from None
        newest = self.latest()
        if newest is not None:
            size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
            free = shutil.disk_usage(self.dir).free
            if free < size:
                logger.warning("checkpoint dir %s has %.1f GiB free, less than the last checkpoint (%.1f GiB)",
                               self.dir, free / 2**30, size / 2**30)

    # --- saving -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, data_state: dict, config) -> Path:
        """Collective. Synchronous: returns once ``iter_N`` is committed. With ``async_save``:
        returns once the state is staged; ``iter_N`` is committed by a later ``poll`` / ``wait``
        (a save still in flight from before is waited for first)."""
        started = time.perf_counter()
        if self.background is not None:
            self.background.poll(wait=True)
        rank = dist.get_rank()
        final = self.dir / f"iter_{step:07d}"
        tmp = self.dir / f"iter_{step:07d}.tmp"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir()
        _barrier()
        model_sd = model.sharded_state_dict()
        state = {"model": model_sd,
                 "optimizer": optimizer.sharded_state_dict(model_sd, metadata=self.sharding)}
        with results_queue(background=self.background is not None):
            request = dist_checkpointing.save(state, str(tmp), content_metadata=self.sharding,
                                              async_sharded_save=self.background is not None)
        torch.save({"rng": _rng_state(), "data": data_state,
                    "dp_rank": parallel_state.get_data_parallel_rank()}, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "layout": _layout()},
                       tmp / "trainer.pt")
            # config.yaml (+ the chat template's text, the tokenizer's files)
            save_run_config(config, tmp, tokenizer=config.checkpoint.save_tokenizer)
        if self.background is None:
            self._commit(step, tmp, final)
        else:
            self.background.start(step, request, tmp, self.checksums,
                                  lambda described: self._commit(step, tmp, final, described))
        self.last_save_held_s = time.perf_counter() - started
        self.held_s += self.last_save_held_s
        return final

    def poll(self) -> Optional[int]:
        """Collective, every step with ``async_save``: commit a finished background write (its step)."""
        return self._timed_poll(wait=False)

    def wait(self) -> Optional[int]:
        """Collective: block until a background write is committed (at the end of a run)."""
        return self._timed_poll(wait=True)

    def _timed_poll(self, wait: bool) -> Optional[int]:
        if self.background is None:
            return None
        started = time.perf_counter()
        committed = self.background.poll(wait=wait)
        if committed is not None:
            self.held_s += time.perf_counter() - started
        return committed

    def abandon(self) -> None:
        """The run failed: a background write in flight is not committed."""
        if self.background is not None:
            self.background.abandon()

    def _commit(self, step: int, tmp: Path, final: Path, described: Optional[dict] = None) -> None:
        """Every rank finished writing ``tmp``: manifest, then rename and point ``latest`` at it."""
        _barrier()
        write_manifest(tmp, step, self.checksums, described)  # last: its presence means "complete"
        _barrier()
        if dist.get_rank() == 0:
            if final.exists():  # a checkpoint of this step that the resume skipped: keep it aside
                self.set_aside(final, "replaced")
            os.replace(tmp, final)
            atomic_write_text(self.dir / "latest", final.name)
            self._prune(keep=final)
        _barrier()

    def _prune(self, keep: Path) -> None:
        """Delete finished checkpoints older than the newest ``keep_last`` (by step number, never
        the one just written; directories set aside are not touched)."""
        done = self.candidates()
        for old in done[self.keep_last:] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old)

    # --- loading ----------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler,
             load_optimizer: bool = True) -> Tuple[int, Optional[dict]]:
        """Restore model, optimizer and scheduler; return (step, this rank's data state or None).
        ``load_optimizer=False``: the optimizer keeps its fresh state, its fp32 main weights copied
        from the loaded model (``checkpoint.load_optimizer``).

        Any failure raises (the caller, ``training/resume.py``, decides about falling back).

        RNG states are per rank: restored only at the same layout. The data position belongs to
        a data-parallel rank: restored whenever the DP size is unchanged (TP/PP may differ);
        with another DP size the data order starts afresh.
        """
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        if load_optimizer:
            self._load_with_optimizer(path, model, optimizer)
        else:
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
            model.load_state_dict(state["model"])
            optimizer.reload_model_params()  # the fp32 main weights (bf16 / distributed) from the loaded ones
        # Built with override_opt_param_scheduler: the schedule's shape comes from the config
        # (train_steps, warmup, decay), only the step count from the checkpoint.
        scheduler.num_steps = 0  # load_state_dict adds the saved count (a failed attempt may have run)
        scheduler.load_state_dict(trainer["scheduler"])
        data_state = None
        layout = _layout()
        if trainer["layout"] == layout:
            extras = torch.load(path / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
            _set_rng_state(extras["rng"])
            data_state = extras["data"]
        else:
            saved = _data_states_by_dp_rank(path)
            if trainer["layout"]["dp"] == layout["dp"]:
                data_state = saved.get(parallel_state.get_data_parallel_rank())
            else:  # another data-parallel size: every old position, for data/reshard.py
                data_state = {"reshard": [saved[r] for r in sorted(saved)]}
        return trainer["step"], data_state

    def _load_with_optimizer(self, path: Path, model, optimizer) -> None:
        _prepare_optimizer_for_load(optimizer)
        configured = _configured_hyperparameters(optimizer)
        model_sd = model.sharded_state_dict()
        sharding = saved_sharding(path)  # the checkpoint's own format, whatever this run saves in
        request = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=sharding)
        running = param_groups_compat.running_groups(optimizer, request)
        param_groups_compat.fit_request(request, dist_checkpointing.load_common_state_dict(str(path)))
        state = dist_checkpointing.load({"model": model_sd, "optimizer": request}, str(path))
        model.load_state_dict(state["model"])
        if param_groups_compat.regroup(state["optimizer"], running):
            logger.warning("checkpoint %s was saved with weight decay on biases and 1-D parameters (one param group "
                           "per learning rate): its optimizer state is read into the current groups, which exempt "
                           "them", path)
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        _adam_steps_per_parameter(optimizer)
        _restore_hyperparameters(optimizer, configured)

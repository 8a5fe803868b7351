"""Resumable distributed checkpoints with megatron ``dist_checkpointing``.

Layout of ``<dir>``::

    iter_0000100/          one complete checkpoint (model + optimizer shards, torch_dist format)
      trainer.pt           step, scheduler, parallel layout          (rank 0)
      rank_00003.pt        RNG states and data-iterator position     (every rank)
      config.yaml          the resolved config of the run
    latest                 name of the newest complete checkpoint (replaced atomically)

A save writes ``iter_N.tmp/`` and renames it only after every rank finished, then updates
``latest``: a save killed half-way leaves the previous checkpoint and pointer untouched (the
stale ``.tmp`` is removed by the next save). Model and optimizer are saved in megatron's
reshardable formats, so a checkpoint loads at another TP/PP layout.

Why saves were slow (184 s first save on CPU): megatron's writer creates its results queue
with ``multiprocessing.get_context("spawn").Manager()``, i.e. a fresh interpreter that
re-imports the training script, torch and megatron before it answers. For synchronous saves
the queue is only touched by the saving process itself, so an in-process ``queue.Queue``
is exact and starts nothing: the first save now takes ~0.2 s for the tiny model.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async

from casa_megatron.config import save_config

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, incomplete, other model)."""


def _use_in_process_results_queue() -> None:
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


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


def _unshare_adam_steps(optimizer) -> None:
    """megatron restores Adam's ``step`` as ONE tensor shared by every parameter's state; torch's
    AdamW increments ``state["step"]`` in place per parameter, so a shared tensor would advance
    once per parameter per update and corrupt the bias correction. Give each its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.dir = Path(directory)
        self.keep_last = keep_last
        _use_in_process_results_queue()

    # --- finding ----------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "trainer.pt").exists():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path

    # --- saving -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, data_state: dict, config) -> Path:
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
                 "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_SHARDING)}
        dist_checkpointing.save(state, str(tmp), content_metadata=OPTIMIZER_SHARDING)
        torch.save({"rng": _rng_state(), "data": data_state,
                    "dp_rank": parallel_state.get_data_parallel_rank()}, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "layout": _layout()},
                       tmp / "trainer.pt")
            save_config(config, tmp / "config.yaml")
        _barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / "latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old)

    # --- loading ----------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler) -> Tuple[int, Optional[dict]]:
        """Restore model, optimizer and scheduler; return (step, this rank's data state or None).

        RNG states are per rank: restored only at the same layout. The data position belongs to
        a data-parallel rank: restored whenever the DP size is unchanged (TP/PP may differ);
        with another DP size the data order starts afresh.
        """
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        _prepare_optimizer_for_load(optimizer)
        model_sd = model.sharded_state_dict()
        try:
            state = dist_checkpointing.load(
                {"model": model_sd,
                 "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                           metadata=OPTIMIZER_SHARDING)},
                str(path))
        except (KeyError, ValueError, RuntimeError, AssertionError) as exc:  # mismatched keys / shapes
            raise CheckpointError(f"checkpoint {path} does not fit this model "
                                  f"(another architecture or config?): {exc!r}") from exc
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(trainer["scheduler"])
        data_state = None
        layout = _layout()
        if trainer["layout"] == layout:
            extras = torch.load(path / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
            _set_rng_state(extras["rng"])
            data_state = extras["data"]
        elif trainer["layout"]["dp"] == layout["dp"]:
            dp_rank = parallel_state.get_data_parallel_rank()
            for rank_file in sorted(path.glob("rank_*.pt")):
                extras = torch.load(rank_file, weights_only=False)
                if extras["dp_rank"] == dp_rank:
                    data_state = extras["data"]
                    break
        return trainer["step"], data_state

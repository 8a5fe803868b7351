"""Start a run from an imported checkpoint (``checkpoint.pretrained=DIR``): weights only.
(DIR may also be a training checkpoint: a later stage starting from an earlier one's weights.)

The optimizer, scheduler and data order start fresh; a checkpoint to resume from in
``checkpoint.dir`` takes precedence (a restarted job continues its own run instead of going
back to the pretrained weights). The weights are a megatron dist checkpoint written at TP=1,
PP=1 by ``casa-convert import-hf``; megatron reshards them to this run's TP/PP on load, and
casts them to the run's parameter dtype. The architecture was already taken from the
checkpoint's ``architecture.yaml`` when the config was loaded (config/pretrained.py).
Weights are loaded before the optimizer is built, so its (fp32 main) copies start from them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from casa_megatron.config.pretrained import WEIGHTS_DIR, resolve_pretrained_dir
from casa_megatron.model.lora import LORA_MARK, MAGNITUDE, init_magnitudes
from casa_megatron.training import checkpoint as checkpointing
from casa_megatron.training.checkpoint import CheckpointError
from casa_megatron.training.checkpoint_async import results_queue

logger = logging.getLogger(__name__)


def save_model_weights(model, directory: str | Path, release_model: bool = False) -> None:
    """The model's weights only (no optimizer), in megatron's reshardable dist format.

    ``release_model`` (the importer, which drops the model afterwards): megatron's writer clones
    every tensor that is a *view* before writing any, and the SwiGLU ``linear_fc1`` is saved as
    two views (gate, up) of each weight, so a save would briefly hold a second copy of every
    fc1 (~3.8 GB for Qwen2.5-VL-3B). Here each such weight is cloned into its halves and
    released one at a time first, so the save never holds more than one model. The model's
    parameters are empty afterwards.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    sharded = model.sharded_state_dict()
    if release_model:
        apply_factories(sharded)
        _replace_views_releasing_params(sharded, model)
    with results_queue(background=False):
        dist_checkpointing.save({"model": sharded}, str(directory))


def _replace_views_releasing_params(sharded: dict, model) -> None:
    tensors = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
    by_storage = defaultdict(list)
    for sh in tensors:
        by_storage[sh.data.untyped_storage().data_ptr()].append(sh)
    owners = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    for ptr, group in by_storage.items():
        whole = any(sh.data.untyped_storage().nbytes() == sh.data.numel() * sh.data.element_size()
                    for sh in group)
        if whole or ptr not in owners:
            continue
        for sh in group:
            sh.data = sh.data.clone()
        owners[ptr].data = torch.empty(0, dtype=owners[ptr].dtype)


def load_model_weights(model, directory: str | Path) -> None:
    """The model part of an import (``DIR/weights``) or of a training checkpoint (its
    optimizer state is not read).

    LoRA adapters (``model.lora``, ``model.vision.lora``) the checkpoint does not hold (an import, or a run without
    them) keep their initial values, which leave the model's function unchanged (``B = 0``);
    adapters the checkpoint holds but this model has no place for are refused, not dropped."""
    path = resolve_pretrained_dir(directory)
    path = path / WEIGHTS_DIR if (path / WEIGHTS_DIR).is_dir() else path
    if not (path / "metadata.json").exists():
        raise CheckpointError(f"{path}: no model weights (expected a dist checkpoint written by "
                              "`casa-convert import-hf` or a training checkpoint)")
    sharded = model.sharded_state_dict()
    fresh = _adapters_to_keep(model, sharded, path)
    try:
        state = dist_checkpointing.load({"model": {k: v for k, v in sharded.items() if k not in fresh}}, str(path))
    except (KeyError, ValueError, RuntimeError, AssertionError) as exc:  # mismatched keys / shapes
        raise CheckpointError(f"imported weights {path} do not fit this model: {exc!r}") from exc
    result = model.load_state_dict(state["model"], strict=not fresh)
    if fresh and (set(result.missing_keys) != fresh or result.unexpected_keys):
        raise CheckpointError(f"internal: loading {path} left {sorted(set(result.missing_keys) - fresh)} unset")
    if fresh:
        magnitudes = init_magnitudes(model, fresh)  # DoRA: m = ||W + s B A|| of the loaded weights
        logger.info("%s holds no LoRA adapters: %d adapter tensors start from their initial values "
                    "(B = 0: the loaded model's function%s)", path, len(fresh),
                    f"; {magnitudes} DoRA magnitudes set from the loaded weights" if magnitudes else "")


def _adapters_to_keep(model, sharded: dict, path: Path) -> set:
    """State-dict keys of this model's LoRA tensors that the checkpoint lacks. Adapters (or DoRA
    magnitudes) the checkpoint holds for a part of the model (LM, encoder) configured without
    them are refused: loading around them would compute another function. Decided from the
    config, not from this pipeline stage's modules, which hold only some layers."""
    stored = dist_checkpointing.load_tensors_metadata(str(path))
    saved = sorted(k for k in stored if LORA_MARK in k and not k.startswith("optimizer."))
    cfg = model.model_config
    for part, lora, where in (("lm", cfg.lora, "model.lora"), ("vision", cfg.vision.lora, "model.vision.lora")):
        mine = [k for k in saved if ("vision.blocks." in k) == (part == "vision")]
        if mine and not lora.enabled:
            raise CheckpointError(
                f"{path} holds LoRA adapters ({len(mine)} tensors, e.g. {mine[0]}) that this model has no "
                f"place for: set {where} as the run that wrote it had it, or merge them into the weights "
                "with `casa-convert export-hf` and import that")
        magnitudes = [k for k in mine if k.endswith(MAGNITUDE)]
        if magnitudes and not lora.dora:
            raise CheckpointError(f"{path} holds DoRA magnitudes ({len(magnitudes)}, e.g. {magnitudes[0]}): set "
                                  f"{where}.dora=true as the run that wrote it had it")
    adapters = {k for k in sharded if LORA_MARK in k}
    return {k for k in adapters if sharded[k].key not in stored}


def start_from_pretrained(model, cfg, ckpt: "checkpointing.Checkpointer") -> Optional[str]:
    """Load ``checkpoint.pretrained`` into ``model`` unless the run will resume from ``ckpt``
    (the run's own checkpoints); returns the directory loaded (for the tracker) or None."""
    directory = cfg.checkpoint.pretrained
    if not directory:
        return None
    if cfg.checkpoint.resume and ckpt.latest() is not None:
        return None
    load_model_weights(model, directory)
    return str(directory)

"""A training checkpoint (or an import folder) -> the megatron model in one process (TP=1, PP=1).

Accepted (``conversion/checkpoint_source.locate_checkpoint``, shared with ``casa-convert
export-hf``): a run's checkpoint folder (its ``latest`` pointer is followed, else the newest
``iter_N``), one ``iter_N/`` (``config.yaml`` + megatron's ``metadata.json``), or a folder written
by ``casa-convert import-hf`` (``architecture.yaml`` + ``weights/``). megatron's reshardable format
loads at TP=1 / PP=1 whatever layout wrote it. A training checkpoint's files are checked against
its manifest (``training/ckpt_manifest.py``: a missing or truncated shard is named). Anything
else is refused before megatron is imported, naming what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
import yaml

from casa_megatron.config.coerce import from_dict
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.loader import to_dict
from casa_megatron.config.pretrained import ARCHITECTURE_FILE, RUN_CONFIG
from casa_megatron.config.run_files import with_saved_template
from casa_megatron.config.schema import TrainConfig
from casa_megatron.conversion.checkpoint_source import EXPECTED, locate_checkpoint
from casa_megatron.conversion.errors import ConversionError


class NotACheckpoint(ValueError):
    """The path is not a checkpoint this tool can read."""


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Tuple[Path, str]:
    """(the folder holding the weights' config, ``training`` | ``import``) or NotACheckpoint.
    ``verify``: check the files against the manifest (a full read: once per command)."""
    try:
        source = locate_checkpoint(path, verify)
    except ConversionError as exc:
        raise NotACheckpoint(str(exc)) from None
    return source.path, source.kind


def checkpoint_config(path: str | Path, verify: bool = True) -> Tuple[TrainConfig, Path]:
    """The run config a checkpoint was trained with (an import folder: its architecture, other
    fields default) and the folder to load weights from. Not validated: the data it names may
    live elsewhere now."""
    folder, kind = resolve_checkpoint(path, verify)
    name = RUN_CONFIG if kind == "training" else ARCHITECTURE_FILE
    try:
        saved = yaml.safe_load((folder / name).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NotACheckpoint(f"{folder / name} is unreadable ({exc})") from None
    if not isinstance(saved.get("model"), dict):
        raise NotACheckpoint(f"{folder / name} has no 'model' mapping; expected {EXPECTED}")
    explicit = saved if kind == "training" else {"model": saved["model"]}
    try:
        cfg = from_dict(TrainConfig, _merge(to_dict(TrainConfig()), explicit))
    except ConfigError as exc:
        raise NotACheckpoint(f"{folder / name}: {exc}") from None
    if kind == "training":  # the chat template's text saved with the checkpoint, not the file now
        cfg.data = with_saved_template(cfg.data, folder)
    if not torch.cuda.is_available():
        cfg.model.transformer_impl = "local"  # same weights; Transformer Engine needs a GPU
    cfg.model.validate()
    return cfg, folder


def load_checkpoint_model(path: str | Path, image_slots: int = 1, tp: int = 1, pp: int = 1, verify: bool = True):
    """(this rank's model in eval mode, its TrainConfig) at TP=``tp`` / PP=``pp`` (even split;
    any layout the checkpoint was written at). Initialises megatron's groups: one process, or
    the launcher's ``tp * pp`` ranks."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import load_model_weights

    cfg, folder = checkpoint_config(path, verify)
    initialize_parallel(tp, pp, seed=cfg.seed)
    try:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        parallel.validate(cfg.model)
    except ConfigError as exc:
        raise NotACheckpoint(f"--tensor-parallel {tp} --pipeline-parallel {pp} does not fit this model: {exc}") from None
    model = build_vlm(cfg.model, parallel, image_seq_length=image_slots)
    load_model_weights(model, folder)
    return model.eval(), cfg

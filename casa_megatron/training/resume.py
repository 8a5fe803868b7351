"""Resume safely: which checkpoint, whether it fits this run's config, and what may change.

Compatibility is a table (``RESUME_RULES``), first matching pattern wins:

* **must match**: everything under ``model.`` (architecture, fusion, vision, trainability) unless
  listed as changeable, and ``optimizer.use_distributed_optimizer`` (it changes the optimizer
  state's format). A new ``model.*`` field added later falls into this class by default: the
  safe choice, since a silently different architecture is the failure this module prevents.
* **may change**: everything else (``train_steps``, learning rates and schedule, intervals, data
  sources, the parallel layout, tracking, ``checkpoint.*``), and the implementation choices
  ``model.transformer_impl`` / ``model.attention_backend`` / ``model.packed_attention``,
  activation recomputation (``model.recompute.*``, ``model.vision.recompute.*``) and initialisation-only fields.
  Changes are applied and listed in a one-line notice; the LR schedule is rebuilt from the
  config at the checkpoint's step (megatron's ``override_opt_param_scheduler``).
* **trainability** (``model.freeze_lm``, ``model.vision.trainable_blocks``,
  ``model.vision.projector_trainable``, the LoRA adapters ``model.lora.*`` and
  ``model.vision.lora.*``): must match on resume (the optimizer state holds exactly
  the trainable parameters) but may change for a weights-only start
  (``check_compatible(..., weights_only=True)``).

The data position (loader state) is restored only when nothing in ``DATA_POSITION_FIELDS``
changed; otherwise the data order starts afresh, and the notice says why.

Fallback: candidates are tried newest first; one whose files fail the manifest check, or whose
load raises, is reported by path and the previous one is tried. Skipped ones are renamed
(``.damaged`` / ``.unloadable``) once an older checkpoint has loaded, never deleted. If the
directory holds checkpoints and none can be used, the run stops: starting from step 0 there
would overwrite them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from casa_megatron.config import to_dict
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.run_files import template_drift, tokenizer_drift
from casa_megatron.training.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

# TRAINABILITY: what the optimizer state is bound to; it may change where that state is not loaded
# (a weights-only start from checkpoint.pretrained, a resume with checkpoint.load_optimizer=false)
MUST_MATCH, MAY_CHANGE, TRAINABILITY = "must match", "may change", "trainability"
RESUME_RULES: List[Tuple[str, str]] = [
    ("model.transformer_impl", MAY_CHANGE),  # implementation: the same weights
    ("model.attention_backend", MAY_CHANGE),
    ("model.packed_attention", MAY_CHANGE),  # the same attention, with or without a dense mask
    ("model.recompute.*", MAY_CHANGE),  # what backward keeps, not what it computes
    ("model.vision.recompute.*", MAY_CHANGE),
    ("model.lm.init_method_std", MAY_CHANGE),  # used only to initialise
    ("model.fusion.init_from_self_attention", MAY_CHANGE),
    ("model.freeze_lm", TRAINABILITY),
    ("model.trainable_tokens", TRAINABILITY),
    ("model.vision.trainable_blocks", TRAINABILITY),
    ("model.vision.projector_trainable", TRAINABILITY),
    ("model.lora.*", TRAINABILITY),  # a weights-only start may add adapters (they start at B = 0)
    ("model.vision.lora.*", TRAINABILITY),
    ("model.*", MUST_MATCH),
    ("optimizer.use_distributed_optimizer", TRAINABILITY),
    ("*", MAY_CHANGE),
]
# Fields that decide which sample comes next; the rest of data.* (workers, prefetch, decoder,
# logging) does not change the stream. micro_batch_size is not one of them: the position (draws
# per source, samples waiting to be packed) is the same stream packed into other micro-batches
# (a batch-size ramp keeps its place; tests/data/test_loader.py).
DATA_POSITION_FIELDS = ["data.*"]
DATA_RUNTIME_FIELDS = ["data.num_workers", "data.worker_type", "data.prefetch", "data.decoder", "data.log_interval"]


class ResumeMismatch(ConfigError):
    """The checkpoint was written by a run whose must-match fields differ from this config."""


def classify(name: str, weights_only: bool = False) -> str:
    """The class of dotted field ``name`` under ``RESUME_RULES``."""
    for pattern, kind in RESUME_RULES:
        if fnmatch.fnmatchcase(name, pattern):
            if kind == TRAINABILITY:
                return MAY_CHANGE if weights_only else MUST_MATCH
            return kind
    return MAY_CHANGE


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass
class Differences:
    mismatched: List[Tuple[str, Any, Any]] = field(default_factory=list)  # (field, saved, now)
    changed: List[Tuple[str, Any, Any]] = field(default_factory=list)

    def data_position_changed(self) -> List[str]:
        return [name for name, _, _ in self.changed
                if any(fnmatch.fnmatchcase(name, p) for p in DATA_POSITION_FIELDS)
                and not any(fnmatch.fnmatchcase(name, p) for p in DATA_RUNTIME_FIELDS)]


_MISSING = "<not set>"


def compare(saved: Dict[str, Any], current: Any, defaults: Any = None, weights_only: bool = False) -> Differences:
    """Compare a checkpoint's resolved config (a nested dict) with this run's config.

    A field the checkpoint does not have (written before the field existed) counts as its
    default value; a field this version does not know is reported as ``<not set>`` now."""
    now = flatten(to_dict(current))
    base = flatten(to_dict(defaults if defaults is not None else type(current)()))
    old = {**base, **flatten(saved)}
    diff = Differences()
    for name in sorted(set(old) | set(now)):
        a, b = old.get(name, _MISSING), now.get(name, _MISSING)
        if a == b:
            continue
        kind = classify(name, weights_only)
        (diff.mismatched if kind == MUST_MATCH else diff.changed).append((name, a, b))
    return diff


def check_compatible(saved: Dict[str, Any], current: Any, source: str, weights_only: bool = False) -> Differences:
    """Raise ``ResumeMismatch`` listing every must-match field that differs (both values);
    return the differences otherwise. ``source`` names the checkpoint in the message."""
    diff = compare(saved, current, weights_only=weights_only)
    if diff.mismatched:
        lines = "; ".join(f"{name}: checkpoint {a!r}, config {b!r}" for name, a, b in diff.mismatched)
        raise ResumeMismatch(f"{source} was written by a different model ({lines}). These fields must match to "
                             f"resume; start a new run_dir (or checkpoint.dir) for another model")
    return diff


def check_optimizer_layout(saved: Dict[str, Any], current: Any, source: str) -> None:
    """A distributed optimizer saved ``dp_reshardable`` keeps megatron's internal buffer layout,
    which depends on TP and PP: it loads at another data-parallel size, not at another TP / PP
    (megatron then fails deep in the load, listing every tensor). Refuse that resume up front."""
    old = {**flatten(to_dict(type(current)())), **flatten(saved)}
    if old["checkpoint.optimizer_format"] != "dp_reshardable" or not old["optimizer.use_distributed_optimizer"]:
        return
    num_layers = old["model.lm.num_layers"]
    fields = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
              "num_layers_in_last_pipeline_stage", "vision_blocks_per_pipeline_stage",
              "virtual_pipeline_model_parallel_size")
    saved_parallel = dataclasses.replace(current.parallel, **{f: old[f"parallel.{f}"] for f in fields})
    was, now = _layout(saved_parallel, num_layers), _layout(current.parallel, num_layers)
    if was != now:
        raise ResumeMismatch(
            f"{source} holds its optimizer state as checkpoint.optimizer_format=dp_reshardable, written at {was}; it "
            f"resumes at another data-parallel size but not at {now}. Resume at {was} with "
            f"checkpoint.optimizer_format=fully_reshardable and save once, then change the layout")


def _layout(par, num_layers: int) -> str:
    """``TP=2, PP=2 (LM layers per stage 1+3)``: what a dp_reshardable optimizer state depends on
    (with the encoder over several stages: ``..., encoder blocks per stage 1+1``; with the
    interleaved schedule: ``..., 2 model chunks per rank``); ``par``: a ParallelConfig."""
    text = f"TP={par.tensor_model_parallel_size}, PP={par.pipeline_model_parallel_size}"
    if par.pipeline_model_parallel_size > 1:
        split = par.vision_blocks_per_pipeline_stage
        encoder = f", encoder blocks per stage {'+'.join(map(str, split))}" if split else ""
        try:
            counts = par.stage_layer_counts(num_layers)
        except ConfigError:  # a saved layout this model cannot split: compare the raw fields
            return (f"{text} (first stage {par.num_layers_in_first_pipeline_stage}, last stage "
                    f"{par.num_layers_in_last_pipeline_stage} layers{encoder})")
        text += f" (LM layers per stage {'+'.join(map(str, counts))}{encoder})"
        if par.virtual_pipeline_model_parallel_size:  # each chunk has buffers of its own
            text += f", {par.virtual_pipeline_model_parallel_size} model chunks per rank"
    return text


def read_saved_config(path: Path) -> Dict[str, Any]:
    """The resolved config stored in checkpoint ``path`` (ValueError if missing or unreadable)."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path / 'config.yaml'} is unreadable ({type(exc).__name__})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path / 'config.yaml'} does not hold a config mapping")
    return saved


def precheck(ckpt, cfg) -> Optional[Differences]:
    """Before anything is built or written: compare the config of the newest checkpoint that has a
    readable one (a mismatch raises). Damaged checkpoints are dealt with in ``resume``."""
    for path in ckpt.candidates():
        try:
            saved = read_saved_config(path)
        except ValueError:
            continue
        return _check(saved, cfg, path)
    return None


def _check(saved: Dict[str, Any], cfg, path: Path) -> Differences:
    """The resume's checks; without the optimizer state (checkpoint.load_optimizer=false, or
    skip_train: weights only) what that state is bound to may change."""
    fresh_optimizer = not cfg.checkpoint.load_optimizer or cfg.skip_train
    diff = check_compatible(saved, cfg, f"checkpoint {path}", weights_only=fresh_optimizer)
    if not fresh_optimizer:
        check_optimizer_layout(saved, cfg, f"checkpoint {path}")
    return diff


def describe_changes(diff: Differences) -> str:
    return ", ".join(f"{name} {a!r} -> {b!r}" for name, a, b in diff.changed)


@dataclass
class Resumed:
    step: int = 0
    path: Optional[Path] = None
    data_state: Optional[dict] = None
    skipped: List[Tuple[Path, str, str]] = field(default_factory=list)  # (path, reason tag, why)


def _first_failure(why: Optional[str]) -> Optional[str]:
    """Every rank must take the same branch: a failure on one rank is a failure everywhere."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return why
    whys: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(whys, why)
    return next((w for w in whys if w is not None), None)


def resume(ckpt, cfg, model, optimizer, scheduler) -> Resumed:
    """Load the newest usable checkpoint of ``ckpt`` (collective), falling back past damaged or
    unloadable ones; ``Resumed()`` (step 0) when the directory holds none.

    Raises ResumeMismatch for a checkpoint of another model, CheckpointError when checkpoints
    exist but none can be used."""
    out = Resumed()
    candidates = ckpt.candidates()
    pointer = ckpt.pointer()
    if candidates and pointer is None:
        logger.warning("%s has no 'latest' pointer; using the checkpoint directories themselves", ckpt.dir)
    elif pointer is not None and (ckpt.dir / pointer) not in candidates:
        logger.warning("%s/latest names %s, which does not exist; using the checkpoint directories", ckpt.dir, pointer)
    for path in candidates:
        problem = ckpt.verify(path)
        if problem is not None:
            logger.error("checkpoint %s is damaged: %s", path, problem)
            out.skipped.append((path, "damaged", problem))
            continue
        try:
            saved = read_saved_config(path)
        except ValueError as exc:
            out.skipped.append((path, "damaged", str(exc)))
            continue
        diff = _check(saved, cfg, path)
        why = None
        try:
            step, data_state = ckpt.load(path, model, optimizer, scheduler,
                                         load_optimizer=cfg.checkpoint.load_optimizer)
        except Exception as exc:  # noqa: BLE001 - any failure to load: report it and fall back
            why = f"{type(exc).__name__}: {str(exc)[:500]}"
        why = _first_failure(why)
        if why is not None:
            logger.error("checkpoint %s could not be loaded: %s", path, why)
            out.skipped.append((path, "unloadable", why))
            continue
        out.step, out.path = step, path
        moved = diff.data_position_changed()
        if moved and data_state is not None:
            logger.warning("data order starts afresh: %s changed since the checkpoint", ", ".join(moved))
            data_state = None
        out.data_state = data_state
        if diff.changed:
            logger.info("resume: applying config changes: %s", describe_changes(diff))
        if not cfg.checkpoint.load_optimizer:
            logger.warning("resume: checkpoint.load_optimizer=false: weights, step %d, LR schedule and data position "
                           "from %s; the optimizer starts afresh (Adam's moments at zero)", step, path.name)
        for drift in (template_drift(cfg.data, path), tokenizer_drift(cfg.data, path)):
            if drift is not None:
                logger.warning("resume: %s", drift)
        break
    if candidates and out.path is None:
        listing = "; ".join(f"{p.name}: {why}" for p, _, why in out.skipped)
        raise CheckpointError(f"{ckpt.dir} holds checkpoints but none can be used ({listing}). Nothing was "
                              f"overwritten; move them away (or set checkpoint.dir to a new directory) to start over")
    if out.path is not None and out.skipped:
        logger.warning("resuming from %s, the newest usable checkpoint (skipped: %s)", out.path.name,
                       ", ".join(p.name for p, _, _ in out.skipped))
        for path, reason, _ in out.skipped:
            ckpt.set_aside(path, reason)
    return out

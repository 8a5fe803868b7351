"""The architecture of an imported checkpoint, and how a recipe takes it.

``casa-convert import-hf`` writes ``architecture.yaml`` next to the weights: the model fields
that fix the shapes and meaning of the weights (all of ``model.lm``, the vision encoder's
structure, which layers hold which fusion module). A run with ``checkpoint.pretrained=DIR``
takes these fields from the checkpoint: a field the recipe leaves unset is filled in; a field
the recipe sets to another value is an error naming both values. Everything else (freezing,
trainable ViT blocks, RoPE scheme of image keys, kernels, parallelism, data, optimizer) stays
the recipe's. The importer applies the same rule between the recipe and the HF ``config.json``.
``checkpoint.pretrained`` may also name a training checkpoint: a later stage (video after
images) then starts from an earlier stage's weights and architecture with a fresh optimizer.

Only fields that a recipe *sets* (YAML or ``key=value``) are compared, so this works on the
explicit dict before defaults are merged in.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import yaml

from casa_megatron.config.errors import ConfigError

ARCHITECTURE_FILE = "architecture.yaml"
WEIGHTS_DIR = "weights"
RUN_CONFIG = "config.yaml"  # the run config inside every training checkpoint (training/checkpoint.py)
# From the checkpoint when unset, but a recipe may change them (they shape no weight).
SOFT_FIELDS = {"lm": {"init_method_std", "max_position_embeddings"}, "vision": set(), "fusion": set()}
# vision fields that shape no weight of the checkpoint: how the run trains and recomputes the encoder
# (older architecture.yaml files hold ``recompute``: ignored when read too)
TRAINING_VISION_FIELDS = ("trainable_blocks", "projector_trainable", "recompute", "lora")
FUSION_FIELDS = ("mechanism", "placement", "share_projections", "cross_attention_gate", "layers", "every_n")


def architecture_of(model) -> dict:
    """The architecture part of a resolved ModelConfig, as plain data."""
    return architecture_from_dict(dataclasses.asdict(model))


def architecture_from_dict(full: dict) -> dict:
    """The same from a model config dict (a run's saved ``config.yaml``; older ones may lack fields)."""
    return {"lm": dict(full.get("lm") or {}),
            "vision": {k: v for k, v in (full.get("vision") or {}).items() if k not in TRAINING_VISION_FIELDS},
            "fusion": {k: v for k, v in (full.get("fusion") or {}).items() if k in FUSION_FIELDS}}


def resolve_pretrained_dir(directory: str | Path) -> Path:
    """``checkpoint.pretrained`` may name an import folder, one training checkpoint
    (``iter_N/``), or a run's checkpoint folder (its ``latest`` pointer is followed)."""
    path = Path(directory)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    return path


def read_architecture(directory: str | Path) -> dict:
    """``architecture.yaml`` of an import, or the ``model`` of a training checkpoint's
    ``config.yaml`` (a later stage starting from an earlier one's weights, fresh optimizer)."""
    path = resolve_pretrained_dir(directory)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.pretrained={str(directory)!r}: no such directory; create it with "
                          f"`casa-convert import-hf HF_DIR {directory} --config RECIPE.yaml`")
    if (path / ARCHITECTURE_FILE).exists():
        data = yaml.safe_load((path / ARCHITECTURE_FILE).read_text()) or {}
        if not isinstance(data.get("model"), dict):
            raise ConfigError(f"{path / ARCHITECTURE_FILE}: no 'model' mapping")
        return data
    if (path / RUN_CONFIG).exists() and (path / "metadata.json").exists():
        run = yaml.safe_load((path / RUN_CONFIG).read_text()) or {}
        if not isinstance(run.get("model"), dict):
            raise ConfigError(f"{path / RUN_CONFIG}: no 'model' mapping")
        return {"model": architecture_from_dict(run["model"]), "source": {"training_checkpoint": str(path)}}
    if (path / "config.json").is_file():  # a Hugging Face folder: megatron reads dist checkpoints only
        raise ConfigError(f"checkpoint.pretrained={str(directory)!r} is a Hugging Face folder (config.json); "
                          f"import it first: `casa-convert import-hf {directory} OUT_DIR --config RECIPE.yaml`, "
                          "then checkpoint.pretrained=OUT_DIR (docs/conversion.md)")
    raise ConfigError(f"checkpoint.pretrained={str(directory)!r} has no {ARCHITECTURE_FILE}: neither a folder "
                      "written by `casa-convert import-hf` (or an interrupted one) nor a training checkpoint")


def merge_architecture(explicit: dict, architecture: dict, source: str) -> dict:
    """``explicit`` (the recipe's YAML + overrides, no defaults) with the architecture filled
    in; raises ConfigError listing every field where the recipe contradicts ``source``."""
    out = copy.deepcopy(explicit)
    model = out.setdefault("model", {})
    conflicts = []
    for section, fields in architecture.items():
        recipe = model.get(section) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"model.{section} must be a mapping")
        merged = dict(recipe)
        for key, value in fields.items():
            if key in ("layers", "every_n") and section == "fusion":
                continue
            if section == "vision" and key in TRAINING_VISION_FIELDS:
                continue
            if key in recipe and key not in SOFT_FIELDS[section]:
                conflicts += _differences(f"model.{section}.{key}", recipe[key], value, source)
            if key not in recipe:
                merged[key] = value
            elif isinstance(value, dict) and isinstance(recipe[key], dict):
                merged[key] = {**value, **recipe[key]}
        if section == "fusion":
            conflicts += _fusion_layer_conflicts(recipe, fields, architecture, source)
            merged["layers"], merged["every_n"] = fields.get("layers"), fields.get("every_n")
        model[section] = merged
    if conflicts:
        raise ConfigError("the recipe contradicts the architecture of " + source + ":\n  " + "\n  ".join(conflicts))
    return out


def _differences(name: str, recipe, value, source: str) -> list:
    if isinstance(value, dict) and isinstance(recipe, dict):
        return [d for k in recipe if k in value for d in _differences(f"{name}.{k}", recipe[k], value[k], source)]
    if recipe != value:
        return [f"{name}: recipe {recipe!r} vs {source} {value!r}"]
    return []


def _fusion_layer_conflicts(recipe: dict, fields: dict, architecture: dict, source: str) -> list:
    """Layer choice is compared as the resolved list (``every_n: 1`` == every layer listed)."""
    if "layers" not in recipe and "every_n" not in recipe:
        return []
    from casa_megatron.config.schema import FusionConfig

    num_layers = architecture.get("lm", {}).get("num_layers")
    if num_layers is None:
        return []
    known = {f.name for f in dataclasses.fields(FusionConfig)}
    mine = FusionConfig(**{**{k: v for k, v in fields.items() if k in known},
                           "layers": recipe.get("layers"), "every_n": recipe.get("every_n")})
    theirs = FusionConfig(**{k: v for k, v in fields.items() if k in known})
    a, b = mine.fusion_layers(num_layers), theirs.fusion_layers(num_layers)
    return [] if a == b else [f"model.fusion layers: recipe {a} vs {source} {b}"]


def apply_pretrained_architecture(data: dict, explicit: dict) -> dict:
    """load_config's hook: with ``checkpoint.pretrained`` set, the resolved ``data`` gets the
    checkpoint's architecture (after checking ``explicit`` against it)."""
    directory: Optional[str] = ((explicit.get("checkpoint") or {}).get("pretrained")
                                if isinstance(explicit, dict) else None)
    if not directory:
        return data
    merged = merge_architecture(explicit, read_architecture(directory)["model"],
                                f"checkpoint.pretrained={directory!r}")
    out = copy.deepcopy(data)
    out["model"] = _deep_update(out.get("model", {}), merged["model"])
    return out


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out

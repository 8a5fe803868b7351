"""A PEFT LoRA adapter merged into the Hugging Face weights that ``import-hf`` reads.

Two users bring one: whoever fine-tuned a backbone with PEFT in transformers and wants to go on
in megatron, and whoever exported a run with ``export-hf --lora separate`` and imports it back.
Without this, ``import-hf`` of such a folder would read the base weights alone: a model that
was never trained, imported without a word.

The merge happens in HF space, before the mapping tables (``W' = W + scale * B A`` per HF module,
with DoRA ``W' = m / ||W + scale * B A||_row * (W + scale * B A)``: PEFT's own ``merge_and_unload``
rules), so it needs no adapter layout of ours: an adapter trained
by PEFT with its own ``A`` for each of ``q_proj`` / ``k_proj`` / ``v_proj`` merges as well as ours
with one shared ``A``, and the tables then fuse, permute and pad the merged weights as any other.
The import is the merged backbone; adapters of the recipe (``model.lora``) start fresh
(``B = 0``) on top of it, as after any import.

Refused with the reason, before a tensor is read: ``fan_in_fan_out`` (GPT-2's Conv1D), adapter
biases, ``modules_to_save``, adapters on embeddings, and modules the checkpoint does not have.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from casa_megatron.config.model_schema import lora_scale
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.safetensors_io import WrappedReader, normalise

# PEFT's adapter folder, as export-hf --lora separate writes it (conversion/lora_export.py) next
# to the weights and as PeftModel.save_pretrained writes it
ADAPTER_DIR = "lora_adapter"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's path to the wrapped model's modules
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's m, one per output row
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", f".{MAGNITUDE_KEY}": "m"}


def resolve_adapter(hf_dir: str | Path, adapter: str = "auto") -> Optional[Path]:
    """``auto``: the folder's ``lora_adapter/`` when there is one; ``none``; or a path."""
    if adapter == "none":
        return None
    path = Path(hf_dir) / ADAPTER_DIR if adapter == "auto" else Path(adapter)
    if adapter == "auto" and not path.exists():
        return None
    if not (path / CONFIG).is_file():
        raise ConversionError(f"{path} is not a PEFT adapter folder (no {CONFIG}): expected what PEFT's "
                              f"save_pretrained or `casa-convert export-hf --lora separate` writes")
    if not (path / WEIGHTS).is_file():
        raise ConversionError(f"{path}: no {WEIGHTS} (only safetensors adapters are read)")
    return path


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module's whole path or its
    dotted suffix (regular expressions allowed)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _check_config(config: dict, where: Path) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA merges into the weights)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: adapters on transposed (Conv1D) weights")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r}: the adapter trains biases")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: whole modules trained beside the adapter")
    if problems:
        raise ConversionError(f"{where}: this PEFT adapter cannot be merged into the import:\n  " +
                              "\n  ".join(problems))


class AdapterMergedReader(WrappedReader):
    """A checkpoint reader (``SafetensorsReader`` interface) whose adapted weights come out merged
    (``W + scale * B A``, DoRA's rescaled rows; computed in float32, returned in the weight's dtype)."""

    def __init__(self, reader, adapter_dir: Path):
        super().__init__(reader)
        self.adapter_dir = Path(adapter_dir)
        config = json.loads((self.adapter_dir / CONFIG).read_text())
        _check_config(config, self.adapter_dir)
        pieces: Dict[str, Dict[str, torch.Tensor]] = {}
        other: List[str] = []
        with safe_open(str(self.adapter_dir / WEIGHTS), framework="pt") as handle:
            for key in handle.keys():
                suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
                if suffix is None or not key.startswith(PREFIX):
                    other.append(key)
                    continue
                module = key[len(PREFIX): -len(suffix)]
                pieces.setdefault(module, {})[SUFFIXES[suffix]] = handle.get_tensor(key)
        if other:
            raise ConversionError(f"{self.adapter_dir / WEIGHTS}: {len(other)} tensors are not a linear's LoRA A / B "
                                  f"or DoRA magnitude (embedding adapters, biases, saved modules): {other[:5]}")
        # weight name -> (A, B, scale, DoRA magnitude or None)
        self.updates: Dict[str, Tuple[torch.Tensor, torch.Tensor, float, Optional[torch.Tensor]]] = {}
        missing, problems = [], []
        for module, ab in sorted(pieces.items()):
            name = normalise(f"{module}.weight")
            if not {"A", "B"} <= set(ab):
                problems.append(f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing")
                continue
            a, b, m = ab["A"], ab["B"], ab.get("m")  # [r, in], [out, r], DoRA: [out]
            if (m is not None) != bool(config.get("use_dora")):
                problems.append(f"{module}: {'a' if m is not None else 'no'} {MAGNITUDE_KEY} with use_dora="
                                f"{bool(config.get('use_dora'))}")
                continue
            rank = a.shape[0]
            if name not in reader:
                missing.append(f"{module} ({name})")
                continue
            if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(reader.shape(name)) or \
                    (m is not None and tuple(m.shape) != (b.shape[0],)):
                problems.append(f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)}"
                                f"{'' if m is None else f', m {tuple(m.shape)}'} do not fit the weight "
                                f"{tuple(reader.shape(name))}")
                continue
            expected = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
            if expected != rank:
                problems.append(f"{module}: rank {rank} in the tensors, {expected} in {CONFIG}")
                continue
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            scale = lora_scale(alpha, rank, bool(config.get("use_rslora")))
            self.updates[name] = (a, b, scale, m)
        if missing:
            raise ConversionError(f"{self.adapter_dir}: the adapter adapts {len(missing)} modules the checkpoint "
                                  f"does not have: {missing[:5]}")
        if problems:
            raise ConversionError(f"{self.adapter_dir}: " + "; ".join(problems[:5]))
        if not self.updates:
            raise ConversionError(f"{self.adapter_dir}: no LoRA tensors in {WEIGHTS}")

    def get(self, name: str) -> torch.Tensor:
        weight = self.reader.get(name)
        if name not in self.updates:
            return weight
        a, b, scale, m = self.updates[name]
        merged = weight.float() + scale * (b.float() @ a.float())
        if m is not None:  # DoRA: the merged direction, rescaled to the learned row norms
            merged *= (m.float() / merged.norm(dim=1))[:, None]
        return merged.to(weight.dtype)

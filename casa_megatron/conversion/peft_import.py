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

Beside the LoRA pairs an adapter may hold whole trained modules and trained embedding rows, the
usual way to fine-tune a chat model whose template brought tokens it had never been trained on:

* ``modules_to_save`` (e.g. ``["embed_tokens", "lm_head"]``): PEFT saves each such module's
  trained copy under the module's own name; it replaces the base tensor.
* ``trainable_token_indices`` (a list for the input embedding, or ``{module: [ids]}``): PEFT's
  ``TrainableTokensLayer`` saves the new values of those rows
  (``<module>.token_adapter.trainable_tokens_delta``, ``[len(ids), hidden]``), written over the
  base rows as PEFT's merge does (``index_copy``). A tied LM head shares them.

A fine-tune that added tokens resized the vocabulary before PEFT wrapped the model: its saved
``embed_tokens`` (and ``lm_head``) have more rows than the base checkpoint. Those saved tables are
the whole of the new vocabulary, so the import takes their size (``vocabulary_rows``) and the
tokenizer saved with the adapter (it holds the added tokens; ``tokenizer_dir``).

Refused with the reason, before a tensor is read: ``fan_in_fan_out`` (GPT-2's Conv1D), adapter
biases, adapters on embeddings, modules the checkpoint does not have, a saved module of another
shape (other than more vocabulary rows), a grown vocabulary whose untied LM head was not saved
(its new rows were never written anywhere) or without a tokenizer beside the adapter, and a
saved input embedding of a model with tied embeddings (PEFT's copy unties it from the LM head,
which a tied model cannot hold: import the folder PEFT's ``merge_and_unload`` saves).
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
TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's trainable_token_indices values
VOCABULARY_TABLES = ("embed_tokens.weight", "lm_head.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer folder


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


def _suffix_match(module: str, targets) -> bool:
    """PEFT's module-name rule for ``modules_to_save`` / ``trainable_token_indices`` keys: the
    whole path or its dotted suffix."""
    return any(module == t or module.endswith(f".{t}") for t in targets or ())


def _token_ids(config: dict, module: str) -> Optional[List[int]]:
    """The ids whose rows ``module``'s token adapter holds: a list applies to the input
    embedding (the one module PEFT gives it), a dict by module name."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        return next((list(ids) for key, ids in spec.items() if _suffix_match(module, [key])), None)
    return list(spec) if spec else None


def _check_config(config: dict, where: Path) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA merges into the weights)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: adapters on transposed (Conv1D) weights")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r}: the adapter trains biases")
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
        self.replaced: Dict[str, torch.Tensor] = {}  # weight name -> a saved module's trained tensor
        self.vocabulary_rows: Optional[int] = None  # a resized vocabulary's rows (saved embed_tokens / lm_head)
        self.rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # weight name -> (ids [k], rows [k, h])
        token_modules: Dict[str, torch.Tensor] = {}
        with safe_open(str(self.adapter_dir / WEIGHTS), framework="pt") as handle:
            for key in handle.keys():
                suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
                if key.startswith(PREFIX) and suffix is not None:
                    module = key[len(PREFIX): -len(suffix)]
                    pieces.setdefault(module, {})[SUFFIXES[suffix]] = handle.get_tensor(key)
                elif key.startswith(PREFIX) and key.endswith(TOKEN_ROWS_SUFFIX):
                    token_modules[key[len(PREFIX): -len(TOKEN_ROWS_SUFFIX)]] = handle.get_tensor(key)
                elif key.startswith(PREFIX) and _suffix_match(key[len(PREFIX):].rsplit(".", 1)[0],
                                                              config.get("modules_to_save")):
                    self.replaced[normalise(key[len(PREFIX):])] = handle.get_tensor(key)
                else:
                    other.append(key)
        if other:
            raise ConversionError(f"{self.adapter_dir / WEIGHTS}: {len(other)} tensors are not a linear's LoRA A / B, "
                                  f"a DoRA magnitude, a module of modules_to_save or trainable token rows "
                                  f"(embedding adapters, biases): {other[:5]}")
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
        self._check_saved_modules(reader, missing, problems)
        self._take_token_rows(reader, config, token_modules, missing, problems)
        if missing:
            raise ConversionError(f"{self.adapter_dir}: the adapter adapts {len(missing)} modules the checkpoint "
                                  f"does not have: {missing[:5]}")
        if problems:
            raise ConversionError(f"{self.adapter_dir}: " + "; ".join(problems[:5]))
        if not (self.updates or self.replaced or self.rows):
            raise ConversionError(f"{self.adapter_dir}: no LoRA tensors in {WEIGHTS}")

    def _check_saved_modules(self, reader, missing: List[str], problems: List[str]) -> None:
        tied = not any(n.endswith("lm_head.weight") for n in reader.names())
        vocabulary = [n for n in reader.names() if n.endswith(VOCABULARY_TABLES)]
        grown = {name: tensor.shape[0] for name, tensor in self.replaced.items() if name in vocabulary
                 and tensor.dim() == 2 and tensor.shape[1] == reader.shape(name)[1]
                 and tensor.shape[0] > reader.shape(name)[0]}
        if grown:
            unsaved = [n for n in vocabulary if grown.get(n) != max(grown.values())]
            if unsaved:
                problems.append(f"modules_to_save resizes the vocabulary to {max(grown.values())} rows in "
                                f"{sorted(grown)} but not in {unsaved}: the new rows of those were never saved")
            elif not any((self.adapter_dir / f).is_file() for f in TOKENIZER_FILES):
                problems.append(f"modules_to_save resizes the vocabulary to {max(grown.values())} rows, and no "
                                f"tokenizer lies beside the adapter to name the added tokens (save the "
                                f"fine-tune's tokenizer into {self.adapter_dir})")
            else:
                self.vocabulary_rows = max(grown.values())
        for name, tensor in self.replaced.items():
            if name not in reader:
                missing.append(f"{name} (modules_to_save)")
            elif tuple(tensor.shape) != tuple(reader.shape(name)) and name not in grown:
                problems.append(f"modules_to_save: the adapter's {name} is {tuple(tensor.shape)}, the checkpoint's "
                                f"{tuple(reader.shape(name))} (a fine-tune that resized the vocabulary? import "
                                "the resized base model it was trained on)")
            elif tied and name.endswith("embed_tokens.weight"):
                problems.append(f"modules_to_save: {name} of a model with tied embeddings: PEFT's trained copy "
                                "feeds the input only, the LM head keeps the original, which a tied model cannot "
                                "hold (import the folder that PEFT's merge_and_unload() saves: it is untied)")

    def _take_token_rows(self, reader, config: dict, token_modules: Dict[str, torch.Tensor],
                         missing: List[str], problems: List[str]) -> None:
        for module, values in sorted(token_modules.items()):
            name = normalise(f"{module}.weight")
            ids = _token_ids(config, module)
            if name not in reader:
                missing.append(f"{module} (trainable_token_indices)")
            elif ids is None:
                problems.append(f"{module}: trainable token rows without trainable_token_indices for it in {CONFIG}")
            elif tuple(values.shape) != (len(ids), reader.shape(name)[1]) or max(ids) >= reader.shape(name)[0] \
                    or min(ids) < 0:
                problems.append(f"{module}: {tuple(values.shape)} trainable token rows for ids {ids[:8]} do not fit "
                                f"the weight {tuple(reader.shape(name))}")
            else:
                self.rows[name] = (torch.tensor(ids, dtype=torch.long), values)

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        """The adapter's folder when its tokenizer replaces the checkpoint's (a grown vocabulary)."""
        return self.adapter_dir if self.vocabulary_rows is not None else None

    def shape(self, name: str) -> Tuple[int, ...]:
        if name in self.replaced:
            return tuple(self.replaced[name].shape)
        return self.reader.shape(name)

    def get(self, name: str) -> torch.Tensor:
        weight = self.reader.get(name)
        if name in self.replaced:  # a module of modules_to_save: its trained copy (maybe more rows)
            weight = self.replaced[name].to(weight.dtype)
        if name in self.rows:  # trainable_token_indices: the trained rows written over the base's
            ids, values = self.rows[name]
            weight = weight.index_copy(0, ids, values.to(weight.dtype))
        if name not in self.updates:
            return weight
        a, b, scale, m = self.updates[name]
        merged = weight.float() + scale * (b.float() @ a.float())
        if m is not None:  # DoRA: the merged direction, rescaled to the learned row norms
            merged *= (m.float() / merged.norm(dim=1))[:, None]
        return merged.to(weight.dtype)

"""LoRA adapters as a PEFT adapter folder (``casa-convert export-hf --lora separate``).

A transformers user who received a LoRA run usually wants the adapters apart from the base
weights: small to share, switchable, loadable with PEFT (``PeftModel.from_pretrained(base, DIR)``
or ``model.load_adapter(DIR)``). Our adapters sit on megatron's fused linears; PEFT's sit on the
HF modules the mapping tables split them into. The split is the weight's own transform:

* a transform that acts on the output rows (the grouped QKV -> ``q_proj``/``k_proj``/``v_proj``
  with Helium's Q/K row permutation, the ViT's fused ``qkv``, SwiGLU ``[gate; up]`` ->
  ``gate_proj``/``up_proj`` with the vision MLP's padding, identity) is applied to ``B``
  ([out, r]), and ``A`` ([r, in]) is shared by the pieces (PEFT gets a copy per module:
  ``y_q = B_q A x`` is the ``q`` rows of ``B A x``);
* the vision MLP's padded *input* columns (``fc2``, ``PadFFN(dim=1)``) are sliced from ``A``,
  and ``B`` is kept whole;
* DoRA's magnitude (one per output row) follows ``B``'s rows (PEFT's ``lora_magnitude_vector``).

``alpha / rank`` is PEFT's ``lora_alpha / r``, ``alpha / sqrt(rank)`` (``rslora``) its
``use_rslora``; the encoder's rank and alpha, when they differ from the LM's, go to
``rank_pattern`` / ``alpha_pattern``. PEFT has one ``use_rslora`` for the whole adapter: the LM's
(or the encoder's, without LM adapters) decides, and the other component's ``alpha_pattern`` is
the alpha that gives its own scale under that convention.

Adapter keys name modules, not checkpoint tensors: in the native Qwen2.5-VL format the two differ
(``hf_formats.MODULE_PREFIXES``), so the export checks every adapted module against the model
transformers builds from the exported ``config.json`` (on the meta device) before writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from casa_megatron.conversion.engine import component_of
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_formats import module_path
from casa_megatron.conversion.mapping import bind_all
from casa_megatron.conversion.peft_import import ADAPTER_DIR, CONFIG, MAGNITUDE_KEY, PREFIX, WEIGHTS
from casa_megatron.conversion.transforms import QKV, FusedQKV, GatedMLP, PadFFN, Transform, ZeroPad

ROW_TRANSFORMS = (QKV, FusedQKV, GatedMLP, PadFFN)


def _split(transform: Transform, a: Tensor, b: Tensor, m: Optional[Tensor]) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """(A, B, DoRA magnitude or None) per HF module of one adapted megatron weight; the
    magnitude is per output row, so it follows B's rows."""
    if isinstance(transform, ZeroPad) and transform.dim == 1:  # padded input columns
        (a_hf,) = transform.to_hf(a)
        return [(a_hf, b, m)]
    if type(transform) is not Transform and not isinstance(transform, ROW_TRANSFORMS):
        raise ConversionError(f"no PEFT layout for an adapter on a weight converted by {transform!r}")
    rows = transform.to_hf(b)
    return list(zip([a] * len(rows), rows, transform.to_hf(m) if m is not None else [None] * len(rows)))


def peft_adapter(model: torch.nn.Module, tables, model_cfg, dtype: torch.dtype,
                 fmt: str = "casa") -> Tuple[Dict[str, Tensor], dict]:
    """The adapter tensors under PEFT's names and its ``adapter_config.json``, from a model that
    still holds its adapters (at TP=1), for the exported format ``fmt``."""
    from casa_megatron.model.lora import base_weight_name, lora_adapters

    adapters = dict(lora_adapters(model))  # some: the exporter checked the config (_check_lora_mode)
    bases = {base_weight_name(name): name for name in adapters}
    bindings = bind_all(bases, tables, component_of)
    tensors: Dict[str, Tensor] = {}
    modules: Dict[str, str] = {}  # HF module -> "lm" | "vision"
    for base, binding in bindings.items():
        adapter = adapters[bases[base]]
        magnitude = adapter.lora_magnitude.detach() if adapter.dora else None
        try:
            pieces = _split(binding.transform, adapter.lora_a.detach(), adapter.lora_b.detach(), magnitude)
        except ValueError as e:  # B moved padded MLP units
            raise ConversionError(f"the LoRA adapter of {base}: {e}") from None
        for hf_name, (a, b, m) in zip(binding.hf, pieces, strict=True):
            module = module_path(fmt, hf_name)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype).clone()  # A is shared: one copy each
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype).clone()
            if m is not None:
                tensors[f"{PREFIX}{module}.{MAGNITUDE_KEY}"] = m.to(dtype).clone()
            modules[module] = "vision" if component_of(base) == "vision" else "lm"
    return tensors, _config(model_cfg, modules)


def _config(model_cfg, modules: Dict[str, str]) -> dict:
    loras = {"lm": model_cfg.lora, "vision": model_cfg.vision.lora}
    main = loras["lm"] if loras["lm"].enabled else loras["vision"]
    if len({loras[c].dora for c in set(modules.values())}) > 1:
        raise ConversionError("model.lora.dora and model.vision.lora.dora differ: a PEFT adapter has one use_dora "
                              "for all its modules; export with --lora merge")

    def alpha(lora) -> float:  # PEFT's lora_alpha giving lora.scale under main's convention
        return lora.alpha if lora.rslora == main.rslora else \
            lora.scale * (math.sqrt(lora.rank) if main.rslora else lora.rank)

    rank_pattern = {m: loras[c].rank for m, c in sorted(modules.items()) if loras[c].rank != main.rank}
    alpha_pattern = {m: alpha(loras[c]) for m, c in sorted(modules.items()) if alpha(loras[c]) != main.alpha}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": main.rank, "lora_alpha": main.alpha,
            "lora_dropout": main.dropout, "target_modules": sorted(modules), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "bias": "none", "use_rslora": main.rslora, "use_dora": main.dora,
            "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": None}


def check_modules(config: dict, adapter_config: dict) -> None:
    """Every module the adapter targets exists in transformers' native Qwen2.5-VL built from the
    exported ``config.json`` (meta device: no memory); ConversionError naming the missing ones, so
    a transformers release that moves modules fails the export instead of an adapter PEFT would
    load with a warning and ignore."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    present = {name for name, _ in hf.named_modules()}
    missing = [m for m in adapter_config["target_modules"] if m not in present]
    if missing:
        raise ConversionError(f"{len(missing)} adapted modules are not in transformers' "
                              f"Qwen2_5_VLForConditionalGeneration: {missing[:5]}")


def write_adapter(folder: Path, tensors: Dict[str, Tensor], config: dict) -> None:
    """``folder/lora_adapter`` with PEFT's two files (``folder``: the export's temporary folder,
    renamed into place with everything else)."""
    from safetensors.torch import save_file

    out = Path(folder) / ADAPTER_DIR
    out.mkdir()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

"""Read a Hugging Face ``config.json`` into our architecture fields (``model.lm.*``).

The HF config decides the architecture; the recipe decides fusion, parallelism and training.
transformers' ``AutoConfig`` normalises the old and new config formats (``rope_scaling`` vs
``rope_parameters``, Qwen2.5-VL's flat fields vs ``text_config``); this module then checks
that the family is one the megatron model reproduces exactly and refuses, naming the field,
what it cannot (sliding-window attention, biases megatron would put elsewhere, other RoPE
scalings, another activation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

from casa_megatron.config.errors import ConfigError
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_configs.casa import casa_architecture, tiny_vit_config
from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf

# model_type -> our family; the LM is read from the config itself or its ``text_config``.
FAMILIES = {"qwen2": "qwen2", "qwen2_5_vl": "qwen2_5_vl", "qwen3": "qwen3", "helium": "helium", "llama": "llama",
            "mistral": "mistral"}
VOCAB_MULTIPLE = 128  # padded vocabulary: divisible by TP 1..128 (powers of 2), same at every TP
ROPE_TYPES = ("default", "linear", "llama3")

# Vision config readers by vision kind: the HF ``vision_config`` (as a dict) -> model.vision
# fields. A new encoder registers its reader here and its table with
# ``tables.register_vision_table``.
VISION_CONFIG_READERS: Dict[str, Callable[[dict], dict]] = {"qwen2_5_vl": vision_config_from_hf,
                                                             "tiny_vit": tiny_vit_config}
CASA = "casa"  # our own export (casa-convert export-hf): LM, vision and fusion from config.json


@dataclass
class HFArchitecture:
    family: str
    model_type: str
    lm: dict  # model.lm fields
    vision_kind: Optional[str] = None  # "qwen2_5_vl" when the checkpoint holds a vision encoder
    vision: dict = field(default_factory=dict)  # model.vision fields (when a reader is registered)
    vision_output_size: Optional[int] = None  # width the checkpoint's merger maps to (its LM's)
    torch_dtype: Optional[str] = None
    fusion: Optional[dict] = None  # model.fusion architecture fields (a CASA folder fixes them)
    fusion_defaults: dict = field(default_factory=dict)  # model.fusion fields a recipe may change


def read_hf_config(hf_dir: str | Path) -> HFArchitecture:
    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.exists():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type == CASA:
        arch = casa_architecture(raw, path)
        return HFArchitecture(family=arch["lm"]["family"], model_type=CASA, lm=arch["lm"],
                              vision_kind=arch["vision_kind"], vision=arch["vision"],
                              vision_output_size=arch["lm"]["hidden_size"], torch_dtype=arch["dtype"],
                              fusion=arch["fusion"], fusion_defaults=arch["fusion_defaults"])
    if model_type not in FAMILIES:
        raise ConversionError(
            f"{path}: unsupported architecture model_type={model_type!r} "
            f"(architectures={raw.get('architectures')}); supported: {sorted([*FAMILIES, CASA])}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    family = FAMILIES[model_type]
    text = getattr(config, "text_config", None) if family == "qwen2_5_vl" else config
    lm = _lm_fields(text, family, path)
    lm["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    arch = HFArchitecture(family=family, model_type=model_type, lm=lm,
                          torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype")
                                          or (raw.get("text_config") or {}).get("dtype") or "") or None)
    if family == "qwen2_5_vl":
        arch.vision_kind = "qwen2_5_vl"
        vision = config.vision_config.to_dict()
        arch.vision_output_size = int(vision.get("out_hidden_size") or text.hidden_size)
        reader = VISION_CONFIG_READERS.get(arch.vision_kind)
        if reader is not None:
            try:
                arch.vision = reader(vision)
            except ConfigError as exc:
                raise ConversionError(f"{path}: {exc}") from exc
    return arch


def _lm_fields(cfg, family: str, path: Path) -> dict:
    def refuse(what: str):
        raise ConversionError(f"{path}: {what} is not supported for family {family!r}")

    if getattr(cfg, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act={cfg.hidden_act!r} (SwiGLU with silu only)")
    if getattr(cfg, "use_sliding_window", False):
        refuse("use_sliding_window=true (sliding-window attention layers)")
    if getattr(cfg, "mlp_bias", False):
        refuse("mlp_bias=true")
    if family == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        refuse(f"sliding_window={cfg.sliding_window} (sliding-window attention; Mistral-7B-v0.3 and later "
               "set null)")
    if family in ("llama", "helium", "qwen3", "mistral") and getattr(cfg, "attention_bias", False):
        refuse("attention_bias=true (bias on q/k/v *and* o_proj)")
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        refuse("layer_types with 'sliding_attention' (sliding-window attention layers)")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        refuse(f"rope_type={rope_type!r} (supported: {ROPE_TYPES})")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    fields = dict(
        family=family,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=VOCAB_MULTIPLE,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
        ffn_hidden_size=cfg.intermediate_size,
        kv_channels=None if head_dim * heads == cfg.hidden_size else head_dim,
        add_qkv_bias=family in ("qwen2", "qwen2_5_vl"),  # Qwen2: bias on q/k/v, none on o_proj
        qk_layernorm=family == "qwen3",  # Qwen3: RMSNorm per query / key head before RoPE
        rotary_base=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        norm_epsilon=float(cfg.rms_norm_eps),
        max_position_embeddings=int(cfg.max_position_embeddings),
        init_method_std=float(getattr(cfg, "initializer_range", 0.02)),
        rope_scaling=_rope_scaling(rope, rope_type),
        mrope_section=list(rope["mrope_section"]) if rope.get("mrope_section") else None,
    )
    return fields


def _rope_scaling(rope: dict, rope_type: str) -> dict:
    if rope_type == "default":
        return {"type": "none", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    out = {"type": rope_type, "factor": float(rope["factor"]), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
    if rope_type == "llama3":
        out.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    return out

"""Our own exported ``config.json`` (``model_type: casa``) -> architecture fields, so that
``import-hf`` of an ``export-hf`` folder rebuilds the same model and gives back the same tensors.

Read from the raw dict (the class lives in the folder's remote code, which an import never
executes). Unlike a plain HF backbone, a CASA folder also fixes the fusion (mechanism,
placement, layers, shared projections, gate); the image-key positions and the image norm come
along as defaults that a recipe may change. ``casa_megatron`` carries the megatron-only
padding (vocabulary, vision MLP) so that the rebuilt parameters have the exported model's shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_configs.vision import FFN_PAD_MULTIPLE, vision_config_from_hf

LM_FAMILIES = ("generic", "qwen2", "qwen2_5_vl", "qwen3", "helium", "llama", "mistral")


def tiny_vit_config(d: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``vision_config`` of a CASA folder with our ``tiny_vit`` -> ``model.vision`` fields."""
    return {"encoder": "tiny_vit", "num_layers": int(d["depth"]), "hidden_size": int(d["hidden_size"]),
            "num_attention_heads": int(d["num_heads"]), "ffn_hidden_size": int(d["intermediate_size"]),
            "patch_size": int(d.get("patch_size", 14)), "in_channels": int(d.get("in_channels", 3)),
            "spatial_merge_size": int(d.get("spatial_merge_size", 2)),
            "norm_epsilon": float(d.get("rms_norm_eps", 1e-6)), "temporal_patch_size": 1}


def _rope(params: Mapping[str, Any]) -> Dict[str, Any]:
    kind = params.get("rope_type", "default")
    out = {"type": "none" if kind == "default" else kind, "factor": float(params.get("factor", 1.0)),
           "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
           "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
           "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 8192))}
    if out["type"] not in ("none", "linear", "llama3"):
        raise ConversionError(f"rope_parameters.rope_type={kind!r} is not supported")
    return out


def casa_architecture(raw: Mapping[str, Any], path: Path) -> Dict[str, Any]:
    """``{"lm", "vision", "vision_kind", "fusion", "fusion_defaults", "dtype"}`` of a CASA folder."""
    try:
        hints = raw.get("casa_megatron") or {}
        family = raw.get("lm_family", "generic")
        if family not in LM_FAMILIES:
            raise ConversionError(f"{path}: lm_family={family!r} not in {LM_FAMILIES}")
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rope = raw.get("rope_parameters") or {}
        lm = dict(family=family, vocab_size=int(raw["vocab_size"]),
                  make_vocab_size_divisible_by=int(hints.get("make_vocab_size_divisible_by", 128)),
                  tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                  num_layers=int(raw["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
                  num_query_groups=int(raw.get("num_key_value_heads") or heads),
                  ffn_hidden_size=int(raw["intermediate_size"]),
                  kv_channels=None if head_dim * heads == hidden else head_dim,
                  add_qkv_bias=bool(raw.get("attention_bias", False)),
                  qk_layernorm=bool(raw.get("qk_layernorm", False)),
                  rotary_base=float(rope.get("rope_theta", 10000.0)), norm_epsilon=float(raw["rms_norm_eps"]),
                  max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                  init_method_std=float(raw.get("initializer_range", 0.02)), rope_scaling=_rope(rope),
                  mrope_section=list(raw["mrope_section"]) if raw.get("mrope_section") else None)
        vision_raw = dict(raw.get("vision_config") or {})
        kind = vision_raw.get("encoder", "tiny_vit")
        if kind == "tiny_vit":
            vision = tiny_vit_config(vision_raw)
        elif kind == "qwen2_5_vl":
            vision = vision_config_from_hf(vision_raw)
            vision["rope_theta"] = float((vision_raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        else:
            raise ConversionError(f"{path}: vision_config.encoder={kind!r} is not supported")
        intermediate = vision["ffn_hidden_size"]
        vision["ffn_pad_multiple"] = int(hints.get("ffn_pad_multiple", 1 if intermediate % FFN_PAD_MULTIPLE == 0
                                                   else FFN_PAD_MULTIPLE))
        mechanism = raw.get("fusion_mechanism", "casa")
        fusion = dict(mechanism=mechanism, placement=raw.get("fusion_placement", "parallel"),
                      share_projections=bool(raw.get("share_projections", False)),
                      cross_attention_gate=bool(raw.get("cross_attention_gate", False)),
                      layers=[int(i) for i in raw.get("fusion_layers") or []] if mechanism != "insertion" else None,
                      every_n=None)
        defaults = dict(image_position_scheme=raw.get("image_position_scheme", "auto"),
                        normalize_images=bool(raw.get("normalize_images", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: not a valid CASA config ({type(exc).__name__}: {exc})") from exc
    return {"lm": lm, "vision": vision, "vision_kind": kind, "fusion": fusion, "fusion_defaults": defaults,
            "dtype": raw.get("dtype") or raw.get("torch_dtype")}

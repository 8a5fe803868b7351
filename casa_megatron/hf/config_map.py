"""Our typed ``ModelConfig`` -> the exported ``config.json`` fields of ``CasaConfig``.

The LM family decides the RoPE layout on the HF side (Helium: interleaved). Fields the config does
not have yet on every branch (``lm.family``, ``lm.tie_word_embeddings``, ``lm.resolved_mrope_section``,
``fusion.resolved_image_position_scheme``) are read when present; explicit arguments override.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from casa_megatron.config.schema import ModelConfig

AUTO_MAP = {
    "AutoConfig": "configuration_casa.CasaConfig",
    "AutoModelForCausalLM": "modeling_casa.CasaForCausalLM",
    "AutoProcessor": "processing_casa.CasaProcessor",
}


def casa_config_dict(model: ModelConfig, image_token_id: int, lm_family: Optional[str] = None,
                     tie_word_embeddings: Optional[bool] = None,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    lm, vision, fusion = model.lm, model.vision, model.fusion
    if lm_family is None:
        lm_family = getattr(lm, "family", "generic")
    if tie_word_embeddings is None:
        tie_word_embeddings = bool(getattr(lm, "tie_word_embeddings", False))
    scheme = fusion.image_position_scheme
    if hasattr(fusion, "resolved_image_position_scheme"):
        scheme = fusion.resolved_image_position_scheme(vision.encoder)
    cfg = dict(
        model_type="casa", architectures=["CasaForCausalLM"], auto_map=dict(AUTO_MAP),
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim, rms_norm_eps=lm.norm_epsilon,
        max_position_embeddings=lm.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(lm.rotary_base)},
        attention_bias=lm.add_qkv_bias, lm_family=lm_family, tie_word_embeddings=tie_word_embeddings,
        fusion_mechanism=fusion.mechanism, fusion_placement=fusion.placement,
        fusion_layers=fusion.fusion_layers(lm.num_layers), share_projections=fusion.share_projections,
        cross_attention_gate=fusion.cross_attention_gate, image_position_scheme=scheme,
        mrope_section=getattr(lm, "resolved_mrope_section", None),
        normalize_images=fusion.normalize_images, image_token_id=int(image_token_id),
        initializer_range=lm.init_method_std,
        vision_config=_vision_dict(vision),
    )
    cfg.update(extra or {})
    return cfg


def _vision_dict(vision) -> Dict[str, Any]:
    out = dict(encoder=vision.encoder, depth=vision.num_layers, hidden_size=vision.hidden_size,
               num_heads=vision.num_attention_heads, intermediate_size=vision.ffn_hidden_size,
               patch_size=vision.patch_size, in_channels=vision.in_channels,
               spatial_merge_size=vision.spatial_merge_size, rms_norm_eps=vision.norm_epsilon)
    if vision.encoder == "tiny_vit":
        return {**out, "temporal_patch_size": 1}
    # qwen2_5_vl: transformers' Qwen2_5_VLVisionConfig fields (read when the config has them)
    for name, default in (("temporal_patch_size", 2), ("window_size", 112), ("tokens_per_second", 2),
                          ("fullatt_block_indexes", [7, 15, 23, 31])):
        out[name] = getattr(vision, name, default)
    out.pop("rms_norm_eps")
    return out

"""Our typed ``ModelConfig`` -> the exported ``config.json`` fields of ``CasaConfig``.

The LM family decides the RoPE layout on the HF side (Helium: interleaved); RoPE scaling
(linear, llama3) becomes transformers' ``rope_parameters``. ``casa_megatron`` holds what only
the megatron side needs to rebuild the same parameters on ``import-hf`` (vocabulary and vision
MLP padding); transformers keeps it as a plain attribute.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from casa_megatron.config.schema import ModelConfig

# The same class serves both model entries: ``AutoModelForImageTextToText`` is what transformers'
# ``pipeline("image-text-to-text")`` (and a VLM user) loads; without it the pipeline refuses the folder.
AUTO_MAP = {
    "AutoConfig": "configuration_casa.CasaConfig",
    "AutoModelForCausalLM": "modeling_casa.CasaForCausalLM",
    "AutoModelForImageTextToText": "modeling_casa.CasaForCausalLM",
    "AutoProcessor": "processing_casa.CasaProcessor",
}


def rope_parameters(lm) -> Dict[str, Any]:
    """``model.lm`` RoPE -> transformers' ``rope_parameters`` (megatron's linear scaling divides
    positions by the factor, as transformers' ``linear`` divides the frequencies)."""
    out: Dict[str, Any] = {"rope_type": "default", "rope_theta": float(lm.rotary_base)}
    scaling = lm.rope_scaling
    if scaling.type == "linear":
        out.update(rope_type="linear", factor=float(scaling.factor))
    elif scaling.type == "llama3":
        out.update(rope_type="llama3", factor=float(scaling.factor), low_freq_factor=float(scaling.low_freq_factor),
                   high_freq_factor=float(scaling.high_freq_factor),
                   original_max_position_embeddings=int(scaling.original_max_position_embeddings))
    return out


def casa_config_dict(model: ModelConfig, image_token_id: int, lm_family: Optional[str] = None,
                     tie_word_embeddings: Optional[bool] = None,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    lm, vision, fusion = model.lm, model.vision, model.fusion
    lm_family = lm.family if lm_family is None else lm_family
    tie_word_embeddings = lm.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    scheme = fusion.resolved_image_position_scheme(vision.encoder)
    cfg = dict(
        model_type="casa", architectures=["CasaForCausalLM"], auto_map=dict(AUTO_MAP),
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim, rms_norm_eps=lm.norm_epsilon,
        max_position_embeddings=lm.max_position_embeddings,
        rope_parameters=rope_parameters(lm),
        attention_bias=lm.add_qkv_bias, qk_layernorm=lm.qk_layernorm, lm_family=lm_family, tie_word_embeddings=tie_word_embeddings,
        fusion_mechanism=fusion.mechanism, fusion_placement=fusion.placement,
        fusion_layers=fusion.fusion_layers(lm.num_layers), share_projections=fusion.share_projections,
        cross_attention_gate=fusion.cross_attention_gate, image_position_scheme=scheme,
        mrope_section=lm.mrope_section,
        normalize_images=fusion.normalize_images, image_token_id=int(image_token_id),
        initializer_range=lm.init_method_std,
        vision_config=_vision_dict(vision),
        casa_megatron=dict(make_vocab_size_divisible_by=lm.make_vocab_size_divisible_by,
                           ffn_pad_multiple=vision.ffn_pad_multiple),
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
    # qwen2_5_vl: transformers' Qwen2_5_VLVisionConfig fields (None = every block attends fully)
    full = vision.fullatt_block_indexes
    out.update(temporal_patch_size=vision.temporal_patch_size, window_size=vision.window_size,
               tokens_per_second=int(vision.tokens_per_second),
               rope_parameters={"rope_type": "axial", "rope_theta": float(vision.rope_theta)},
               fullatt_block_indexes=list(range(vision.num_layers)) if full is None else list(full))
    out.pop("rms_norm_eps")
    return out

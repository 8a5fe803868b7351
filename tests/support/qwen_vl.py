"""A tiny random transformers ``Qwen2_5_VLForConditionalGeneration`` and a test-only loader of its
weights into our insertion VLM (LM tensors here; vision + merger through the conversion table).

The LM mapping is deliberately minimal (the real import tables belong to ``conversion/``): it
exists so that the insertion baseline can be checked end to end against transformers.
"""

from __future__ import annotations

from typing import Dict

import torch
from support.qwen_vision import hf_vision_config

IMAGE_ID, VIDEO_ID, VOCAB = 120, 121, 128


def hf_qwen_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 2, 2]}),
        vision_config=hf_vision_config().to_dict(), image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def model_config(hf):
    """Our insertion ModelConfig with the HF model's architecture."""
    from casa_megatron.config import FusionConfig, LanguageModelConfig, ModelConfig, VisionConfig
    from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf

    t = hf.config.text_config
    lm = LanguageModelConfig(vocab_size=t.vocab_size, num_layers=t.num_hidden_layers, hidden_size=t.hidden_size,
                             num_attention_heads=t.num_attention_heads, num_query_groups=t.num_key_value_heads,
                             ffn_hidden_size=t.intermediate_size, add_qkv_bias=True,
                             rotary_base=t.rope_parameters["rope_theta"], norm_epsilon=t.rms_norm_eps,
                             mrope_section=list(t.rope_parameters["mrope_section"]))
    vision = VisionConfig(**vision_config_from_hf(hf.config.vision_config.to_dict()))
    return ModelConfig(lm=lm, vision=vision, fusion=FusionConfig(mechanism="insertion"), transformer_impl="local")


def _fused_qkv(q, k, v, heads: int, groups: int):
    """HF q/k/v rows -> megatron's grouped [ng, (np/ng + 2), hn] rows (weight or bias)."""
    per = heads // groups
    q = q.reshape(groups, per, -1, *q.shape[1:])
    k = k.reshape(groups, 1, -1, *k.shape[1:])
    v = v.reshape(groups, 1, -1, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[3:])


def to_megatron(hf, cfg) -> Dict[str, torch.Tensor]:
    from casa_megatron.conversion.vision_tables import hf_to_megatron

    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    hub = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in sd.items()}
    lm = cfg.lm
    out = {"embedding.word_embeddings.weight": hub["model.embed_tokens.weight"],
           "output_layer.weight": hub["lm_head.weight"],
           "decoder.final_layernorm.weight": hub["model.norm.weight"]}
    for i in range(lm.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.linear_qkv.{kind}"] = _fused_qkv(
                *(hub[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"),
                lm.num_attention_heads, lm.num_query_groups)
        out[dst + "input_layernorm.weight"] = hub[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_proj.weight"] = hub[src + "self_attn.o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hub[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hub[src + "mlp.gate_proj.weight"],
                                                        hub[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = hub[src + "mlp.down_proj.weight"]
    out.update(hf_to_megatron({k: v for k, v in hub.items() if k.startswith("visual.")}, cfg.vision))
    return out

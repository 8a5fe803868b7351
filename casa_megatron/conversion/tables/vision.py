"""Vision tables: the vision encoder and the projector (Qwen2.5-VL's ``visual.merger``) are
one component, since a checkpoint's merger belongs to its encoder.

``tiny_vit`` (our small ViT) uses Qwen2.5-VL's hub names where it has the part, plus its own
``visual.patch_embed.proj.bias`` (a linear with bias over flattened patches, stored 2-D) and
``visual.final_norm.weight`` (COMMON contract). The Qwen2.5-VL encoder's table is written with
that encoder (``register_vision_table``); until it is registered a Qwen2.5-VL checkpoint's
``visual.*`` tensors take the engine's *pending vision table* path.
"""

from __future__ import annotations

from typing import List

from casa_megatron.config.schema import ModelConfig
from casa_megatron.conversion.mapping import Row
from casa_megatron.conversion.transforms import FusedQKV, GatedMLP

V = "vision.blocks.{j}."
HV = "visual.blocks.{j}."


def tiny_vit_rows(model: ModelConfig) -> List[Row]:
    v = model.vision
    qkv = FusedQKV(v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads)
    return [
        Row("vision.patch_embed.weight", "visual.patch_embed.proj.weight"),
        Row("vision.patch_embed.bias", "visual.patch_embed.proj.bias"),
        Row(f"{V}input_layernorm.weight", f"{HV}norm1.weight"),
        Row(f"{V}self_attention.linear_qkv.weight", f"{HV}attn.qkv.weight", qkv),
        Row(f"{V}self_attention.linear_qkv.bias", f"{HV}attn.qkv.bias", qkv),
        Row(f"{V}self_attention.linear_proj.weight", f"{HV}attn.proj.weight"),
        Row(f"{V}self_attention.linear_proj.bias", f"{HV}attn.proj.bias"),
        Row(f"{V}pre_mlp_layernorm.weight", f"{HV}norm2.weight"),
        Row(f"{V}mlp.linear_fc1.weight", (f"{HV}mlp.gate_proj.weight", f"{HV}mlp.up_proj.weight"), GatedMLP()),
        Row(f"{V}mlp.linear_fc1.bias", (f"{HV}mlp.gate_proj.bias", f"{HV}mlp.up_proj.bias"), GatedMLP()),
        Row(f"{V}mlp.linear_fc2.weight", f"{HV}mlp.down_proj.weight"),
        Row(f"{V}mlp.linear_fc2.bias", f"{HV}mlp.down_proj.bias"),
        Row("vision.final_layernorm.weight", "visual.final_norm.weight"),
        *merger_rows(),
    ]


def merger_rows() -> List[Row]:
    """Our PatchMergerProjector <-> Qwen2.5-VL's ``visual.merger`` (ln_q, Linear, GELU, Linear)."""
    return [
        Row("projector.norm.weight", "visual.merger.ln_q.weight"),
        Row("projector.mlp.encoder.linear_fc1.weight", "visual.merger.mlp.0.weight"),
        Row("projector.mlp.encoder.linear_fc1.bias", "visual.merger.mlp.0.bias"),
        Row("projector.mlp.encoder.linear_fc2.weight", "visual.merger.mlp.2.weight"),
        Row("projector.mlp.encoder.linear_fc2.bias", "visual.merger.mlp.2.bias"),
    ]

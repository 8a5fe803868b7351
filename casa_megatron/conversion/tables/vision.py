"""Vision tables: the encoders (component ``vision``) and the projector = Qwen2.5-VL's
``visual.merger`` (component ``projector``, the same rows whatever the encoder).

Both encoders are megatron ``TransformerLayer`` blocks under Qwen2.5-VL's hub names (COMMON
contract), so they share the block rows:

* ``qwen2_5_vl``: the Qwen2.5-VL ViT. Its Conv3d patch embedding (no bias) is our linear over
  flattened ``[C, T, p, p]`` patches (``Conv3dToLinear``); ``attn.qkv`` is fused ``[q; k; v]``
  (``FusedQKV``, MHA: one query head per group); the MLP width is padded with exact zero units
  to ``ffn_pad_multiple`` (``PadFFN``: 3420 -> 3424 so that it splits over TP = 8).
* ``tiny_vit`` (our small ViT) has a patch embedding with bias, stored 2-D
  (``visual.patch_embed.proj.{weight,bias}``), and a final norm ``visual.final_norm.weight``.

The projector = Qwen2.5-VL's merger (``ln_q``, ``mlp.0``, GELU, ``mlp.2``). Its last layer maps
to the width of the LM it was trained with: into an LM of another width the importer takes the
encoder alone and initialises the projector fresh (reported).
"""

from __future__ import annotations

from typing import List, Optional

from casa_megatron.config.schema import ModelConfig, VisionConfig
from casa_megatron.conversion.mapping import Row
from casa_megatron.conversion.transforms import Conv3dToLinear, FusedQKV, GatedMLP, PadFFN

V = "vision.blocks.{j}."
HV = "visual.blocks.{j}."


def block_rows(v: VisionConfig) -> List[Row]:
    """One ViT block (RMSNorm, fused QKV with bias, output projection with bias, SwiGLU with biases)."""
    qkv = FusedQKV(v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads)
    gate_up, down = GatedMLP(pad=_ffn_pad(v, dim=0)), _ffn_pad(v, dim=1)
    return [
        Row(f"{V}input_layernorm.weight", f"{HV}norm1.weight"),
        Row(f"{V}self_attention.linear_qkv.weight", f"{HV}attn.qkv.weight", qkv),
        Row(f"{V}self_attention.linear_qkv.bias", f"{HV}attn.qkv.bias", qkv),
        Row(f"{V}self_attention.linear_proj.weight", f"{HV}attn.proj.weight"),
        Row(f"{V}self_attention.linear_proj.bias", f"{HV}attn.proj.bias"),
        Row(f"{V}pre_mlp_layernorm.weight", f"{HV}norm2.weight"),
        Row(f"{V}mlp.linear_fc1.weight", (f"{HV}mlp.gate_proj.weight", f"{HV}mlp.up_proj.weight"), gate_up),
        Row(f"{V}mlp.linear_fc1.bias", (f"{HV}mlp.gate_proj.bias", f"{HV}mlp.up_proj.bias"), gate_up),
        Row(f"{V}mlp.linear_fc2.weight", f"{HV}mlp.down_proj.weight", down),
        Row(f"{V}mlp.linear_fc2.bias", f"{HV}mlp.down_proj.bias"),
    ]


def _ffn_pad(v: VisionConfig, dim: int) -> Optional[PadFFN]:
    """Zero units up to ``padded_ffn_hidden_size`` (None when the width needs none)."""
    if v.padded_ffn_hidden_size == v.ffn_hidden_size:
        return None
    return PadFFN(v.ffn_hidden_size, v.padded_ffn_hidden_size, dim=dim)


def qwen2_5_vl_rows(model: ModelConfig) -> List[Row]:
    v = model.vision
    return [
        Row("vision.patch_embed.weight", "visual.patch_embed.proj.weight",
            Conv3dToLinear(v.in_channels, v.temporal_patch_size, v.patch_size)),
        *block_rows(v),
    ]


def tiny_vit_rows(model: ModelConfig) -> List[Row]:
    return [
        Row("vision.patch_embed.weight", "visual.patch_embed.proj.weight"),
        Row("vision.patch_embed.bias", "visual.patch_embed.proj.bias"),
        *block_rows(model.vision),
        Row("vision.final_layernorm.weight", "visual.final_norm.weight"),
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

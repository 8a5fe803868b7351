"""The language-model table: one row list for every Llama-like family (Qwen2 / Qwen2.5,
the LM of Qwen2.5-VL, Qwen3, Helium, Llama, Mistral and our own ``generic`` models).

The families share the hub names (COMMON contract); they differ only in what the transforms
carry: GQA shapes, QKV bias (Qwen2), tied embeddings (no ``lm_head``), Qwen3's per-head q/k
norms (``q_norm`` / ``k_norm``, rows only when ``qk_layernorm``) and Helium's interleaved RoPE
(Q/K rows permuted to rotate-half). CASA rows use the ``casa_attn`` names;
they are optional in a checkpoint (a plain LM has none: CASA is then initialised from the
layer's self-attention), except for ``replace`` layers, whose CASA module *is* the backbone's
attention and falls back to ``self_attn`` when ``casa_attn`` is absent.
"""

from __future__ import annotations

from typing import List

from casa_megatron.config.schema import FusionConfig, LanguageModelConfig
from casa_megatron.conversion.mapping import Row
from casa_megatron.conversion.transforms import QKV, GatedMLP, PadVocab

INTERLEAVED_ROPE_FAMILIES = ("helium",)

L = "decoder.layers.{i}."
H = "model.layers.{i}."


def _proj(prefix: str, kind: str, names=("q", "k", "v")):
    return tuple(f"{H}{prefix}.{n}_proj.{kind}" for n in names)


def lm_rows(lm: LanguageModelConfig, fusion: FusionConfig) -> List[Row]:
    qkv = QKV(lm.num_attention_heads, lm.num_query_groups, lm.head_dim,
              interleaved_rope=lm.family in INTERLEAVED_ROPE_FAMILIES)
    vocab = PadVocab(lm.vocab_size, lm.padded_vocab_size)
    rows = [
        Row("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab),
        Row(f"{L}input_layernorm.weight", f"{H}input_layernorm.weight"),
        Row(f"{L}self_attention.linear_qkv.weight", _proj("self_attn", "weight"), qkv),
        Row(f"{L}self_attention.linear_qkv.bias", _proj("self_attn", "bias"), qkv),
        Row(f"{L}self_attention.linear_proj.weight", f"{H}self_attn.o_proj.weight"),
        Row(f"{L}pre_mlp_layernorm.weight", f"{H}post_attention_layernorm.weight"),
        Row(f"{L}mlp.linear_fc1.weight", (f"{H}mlp.gate_proj.weight", f"{H}mlp.up_proj.weight"), GatedMLP()),
        Row(f"{L}mlp.linear_fc2.weight", f"{H}mlp.down_proj.weight"),
        Row("decoder.final_layernorm.weight", "model.norm.weight"),
        Row("output_layer.weight", "lm_head.weight", vocab),
    ]
    if lm.qk_layernorm:
        rows += [Row(f"{L}self_attention.{ours}.weight", f"{H}self_attn.{hub}.weight")
                 for ours, hub in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm"))]
    replace = fusion.placement == "replace"
    if lm.qk_layernorm:  # CASA's own norms (none when it shares SA's projections and norms)
        rows += [Row(f"{L}casa_attention.{ours}.weight", f"{H}casa_attn.{hub}.weight", optional=not replace,
                     fallback=f"{H}self_attn.{hub}.weight" if replace else None)
                 for ours, hub in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm"))]
    rows += [
        Row(f"{L}casa_attention.linear_qkv.weight", _proj("casa_attn", "weight"), qkv, optional=not replace,
            fallback=_proj("self_attn", "weight") if replace else None),
        Row(f"{L}casa_attention.linear_qkv.bias", _proj("casa_attn", "bias"), qkv, optional=not replace,
            fallback=_proj("self_attn", "bias") if replace else None),
        Row(f"{L}casa_attention.linear_proj.weight", f"{H}casa_attn.o_proj.weight", optional=not replace,
            fallback=f"{H}self_attn.o_proj.weight" if replace else None),
        Row(f"{L}casa_layernorm.weight", f"{H}casa_layernorm.weight", optional=True),
        Row(f"{L}casa_gate", f"{H}casa_attn.gate", optional=True),
    ]
    return rows

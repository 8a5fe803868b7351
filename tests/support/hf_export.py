"""A SMALL, temporary megatron (TP=1) -> Hugging Face state-dict mapping for the HF-side tests.

The conversion tables of ``casa-convert`` (issue 9 / 11) replace it; it follows the shared
tensor-name contract so those tables must produce the same folder. Each rule: a regex over the
megatron name, the HF name template(s) and a transform (fused QKV / gate-up split).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

L = r"decoder\.layers\.(\d+)\."
HL = "model.layers.{0}."


def _split_lm_qkv(t: torch.Tensor, heads: int, groups: int) -> List[torch.Tensor]:
    """megatron [ng * (np/ng + 2) * hn, ...] (per group: its q heads, k, v) -> q, k, v."""
    per = heads // groups
    g = t.view(groups, per + 2, -1, *t.shape[1:])
    q = g[:, :per].reshape(-1, *t.shape[1:])
    return [q, g[:, per].reshape(-1, *t.shape[1:]), g[:, per + 1].reshape(-1, *t.shape[1:])]


def _vision_qkv(t: torch.Tensor, heads: int) -> List[torch.Tensor]:
    """megatron per-head [q, k, v] rows -> Qwen2.5-VL's fused [all q; all k; all v]."""
    g = t.view(heads, 3, -1, *t.shape[1:]).transpose(0, 1)
    return [g.reshape(t.shape)]


def _halves(t: torch.Tensor) -> List[torch.Tensor]:
    return list(torch.chunk(t, 2, dim=0))  # megatron fc1 = [gate; up]


def rules(lm_heads: int, lm_groups: int, vit_heads: int) -> List[Tuple[str, List[str], Callable]]:
    one = lambda t: [t]  # noqa: E731
    lm_qkv = lambda t: _split_lm_qkv(t, lm_heads, lm_groups)  # noqa: E731
    return [
        (r"embedding\.word_embeddings\.weight", ["model.embed_tokens.weight"], one),
        (L + r"input_layernorm\.weight", [HL + "input_layernorm.weight"], one),
        (L + r"self_attention\.linear_qkv\.(weight|bias)",
         [HL + "self_attn.q_proj.{1}", HL + "self_attn.k_proj.{1}", HL + "self_attn.v_proj.{1}"], lm_qkv),
        (L + r"self_attention\.linear_proj\.weight", [HL + "self_attn.o_proj.weight"], one),
        (L + r"casa_layernorm\.weight", [HL + "casa_layernorm.weight"], one),
        (L + r"casa_attention\.linear_qkv\.(weight|bias)",
         [HL + "casa_attn.q_proj.{1}", HL + "casa_attn.k_proj.{1}", HL + "casa_attn.v_proj.{1}"], lm_qkv),
        (L + r"casa_attention\.linear_proj\.weight", [HL + "casa_attn.o_proj.weight"], one),
        (L + r"casa_gate", [HL + "casa_attn.gate"], one),
        (L + r"pre_mlp_layernorm\.weight", [HL + "post_attention_layernorm.weight"], one),
        (L + r"mlp\.linear_fc1\.weight", [HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight"], _halves),
        (L + r"mlp\.linear_fc2\.weight", [HL + "mlp.down_proj.weight"], one),
        (r"decoder\.final_layernorm\.weight", ["model.norm.weight"], one),
        (r"output_layer\.weight", ["lm_head.weight"], one),
        (r"vision\.patch_embed\.(weight|bias)", ["visual.patch_embed.proj.{0}"], one),
        (r"vision\.blocks\.(\d+)\.input_layernorm\.weight", ["visual.blocks.{0}.norm1.weight"], one),
        (r"vision\.blocks\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)", ["visual.blocks.{0}.attn.qkv.{1}"],
         lambda t: _vision_qkv(t, vit_heads)),
        (r"vision\.blocks\.(\d+)\.self_attention\.linear_proj\.(weight|bias)", ["visual.blocks.{0}.attn.proj.{1}"], one),
        (r"vision\.blocks\.(\d+)\.pre_mlp_layernorm\.weight", ["visual.blocks.{0}.norm2.weight"], one),
        (r"vision\.blocks\.(\d+)\.mlp\.linear_fc1\.(weight|bias)",
         ["visual.blocks.{0}.mlp.gate_proj.{1}", "visual.blocks.{0}.mlp.up_proj.{1}"], _halves),
        (r"vision\.blocks\.(\d+)\.mlp\.linear_fc2\.(weight|bias)", ["visual.blocks.{0}.mlp.down_proj.{1}"], one),
        (r"vision\.final_layernorm\.weight", ["visual.final_norm.weight"], one),
        (r"projector\.norm\.weight", ["visual.merger.ln_q.weight"], one),
        (r"projector\.mlp\.encoder\.linear_fc1\.(weight|bias)", ["visual.merger.mlp.0.{0}"], one),
        (r"projector\.mlp\.encoder\.linear_fc2\.(weight|bias)", ["visual.merger.mlp.2.{0}"], one),
    ]


def to_hf_tensors(state: Dict[str, torch.Tensor], model_cfg) -> Dict[str, torch.Tensor]:
    """Full TP=1 megatron state dict -> {hf_name: tensor}; every megatron tensor must map."""
    table = rules(model_cfg.lm.num_attention_heads, model_cfg.lm.num_query_groups,
                  model_cfg.vision.num_attention_heads)
    out, unmapped = {}, []
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        for pattern, targets, transform in table:
            m = re.fullmatch(pattern, name)
            if m:
                for target, piece in zip(targets, transform(tensor.detach().float())):
                    out[target.format(*m.groups())] = piece.clone()
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise KeyError(f"megatron tensors with no HF mapping: {unmapped}")
    return out


def export_megatron(model, model_cfg, out_dir: Path, tokenizer_dir: Path, image_token_id: int,
                    **folder_kwargs) -> Path:
    from casa_megatron.hf.config_map import casa_config_dict
    from casa_megatron.hf.folder import write_hf_folder

    tensors = to_hf_tensors(model.state_dict(), model_cfg)
    return write_hf_folder(out_dir, casa_config_dict(model_cfg, image_token_id), tensors,
                           tokenizer_dir=tokenizer_dir, **folder_kwargs)


def tiny_tokenizer(out_dir: Path, vocab: int) -> Path:
    """A word-level tokenizer with our layout tokens (<image> = id 4) and ``vocab`` entries at most."""
    from casa_megatron.data.tokenization import build_word_tokenizer

    words = [f"w{i}" for i in range(vocab - 7)]
    return build_word_tokenizer([" ".join(words)], out_dir)

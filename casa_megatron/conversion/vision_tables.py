"""Mapping tables between our vision encoder + projector and the HF Qwen2.5-VL ``visual.*`` tensors.

A table is a plain list of rows ``(megatron_name, hf_names, transform)``: ``megatron_name`` is
the full (TP=1) parameter name in our VLM, ``hf_names`` the hub tensor name(s), ``{j}`` a block
index. A transform is a small object with ``to_megatron(hf tensors, vision) -> tensor`` and
``to_hf(tensor, vision) -> hf tensors``; export is import inverted. TP splitting happens
afterwards from megatron's partition tags (``parallel/tp_layout.py``), so tables never see TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from casa_megatron.config.schema import VisionConfig


class Transform(Protocol):
    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor: ...

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]: ...


class Identity:
    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor:
        return hf[0]

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]:
        return [t]


class Conv3dAsLinear:
    """HF Conv3d weight [hv, C, T, p, p] (kernel = stride) <-> linear weight [hv, C*T*p*p]."""

    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor:
        return hf[0].reshape(hf[0].shape[0], -1)

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]:
        p = v.patch_size
        return [t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, p, p)]


class QKVHeads:
    """HF fused qkv rows ``[3, heads, d]`` <-> megatron's per-head ``[heads, 3, d]`` (MHA: one
    query per group), for the weight ``[3*h, h]`` and the bias ``[3*h]`` alike."""

    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor:
        x = hf[0]
        heads = v.num_attention_heads
        return x.reshape(3, heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]:
        heads = v.num_attention_heads
        return [t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]


class GateUp:
    """HF ``gate_proj`` + ``up_proj`` <-> megatron ``linear_fc1`` = ``[gate; up]``, each padded
    with zero rows to the padded MLP width (weight and bias alike)."""

    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor:
        pad = v.padded_ffn_hidden_size - v.ffn_hidden_size
        return torch.cat([_pad_dim0(x, pad) for x in hf], dim=0)

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]:
        gate, up = t.chunk(2, dim=0)
        return [gate[:v.ffn_hidden_size], up[:v.ffn_hidden_size]]


class DownPadded:
    """HF ``down_proj`` weight [hv, ffn] <-> megatron ``linear_fc2`` [hv, padded ffn] (zero columns)."""

    def to_megatron(self, hf: Sequence[Tensor], v: VisionConfig) -> Tensor:
        return F.pad(hf[0], (0, v.padded_ffn_hidden_size - v.ffn_hidden_size))

    def to_hf(self, t: Tensor, v: VisionConfig) -> List[Tensor]:
        return [t[:, :v.ffn_hidden_size]]


def _pad_dim0(x: Tensor, pad: int) -> Tensor:
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


IDENTITY, CONV3D, QKV, GATE_UP, DOWN = Identity(), Conv3dAsLinear(), QKVHeads(), GateUp(), DownPadded()

Row = Tuple[str, Tuple[str, ...], Transform]

_BLOCK: List[Row] = [
    ("vision.blocks.{j}.input_layernorm.weight", ("visual.blocks.{j}.norm1.weight",), IDENTITY),
    ("vision.blocks.{j}.self_attention.linear_qkv.weight", ("visual.blocks.{j}.attn.qkv.weight",), QKV),
    ("vision.blocks.{j}.self_attention.linear_qkv.bias", ("visual.blocks.{j}.attn.qkv.bias",), QKV),
    ("vision.blocks.{j}.self_attention.linear_proj.weight", ("visual.blocks.{j}.attn.proj.weight",), IDENTITY),
    ("vision.blocks.{j}.self_attention.linear_proj.bias", ("visual.blocks.{j}.attn.proj.bias",), IDENTITY),
    ("vision.blocks.{j}.pre_mlp_layernorm.weight", ("visual.blocks.{j}.norm2.weight",), IDENTITY),
    ("vision.blocks.{j}.mlp.linear_fc1.weight",
     ("visual.blocks.{j}.mlp.gate_proj.weight", "visual.blocks.{j}.mlp.up_proj.weight"), GATE_UP),
    ("vision.blocks.{j}.mlp.linear_fc1.bias",
     ("visual.blocks.{j}.mlp.gate_proj.bias", "visual.blocks.{j}.mlp.up_proj.bias"), GATE_UP),
    ("vision.blocks.{j}.mlp.linear_fc2.weight", ("visual.blocks.{j}.mlp.down_proj.weight",), DOWN),
    ("vision.blocks.{j}.mlp.linear_fc2.bias", ("visual.blocks.{j}.mlp.down_proj.bias",), IDENTITY),
]

PROJECTOR_TABLE: List[Row] = [
    ("projector.norm.weight", ("visual.merger.ln_q.weight",), IDENTITY),
    ("projector.mlp.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",), IDENTITY),
    ("projector.mlp.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",), IDENTITY),
    ("projector.mlp.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",), IDENTITY),
    ("projector.mlp.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",), IDENTITY),
]

QWEN2_5_VL_VISION_TABLE: List[Row] = [
    ("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), CONV3D),
    *_BLOCK,
]

TINY_VIT_TABLE: List[Row] = [
    ("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), IDENTITY),
    ("vision.patch_embed.bias", ("visual.patch_embed.proj.bias",), IDENTITY),
    *_BLOCK,
    ("vision.final_layernorm.weight", ("visual.final_norm.weight",), IDENTITY),
]


def vision_table(v: VisionConfig, with_projector: bool = True) -> List[Row]:
    """The encoder's table (+ the projector = HF merger), ``{j}`` still unexpanded."""
    base = QWEN2_5_VL_VISION_TABLE if v.encoder == "qwen2_5_vl" else TINY_VIT_TABLE
    return base + (PROJECTOR_TABLE if with_projector else [])


@dataclass(frozen=True)
class Expanded:
    """One expanded row."""

    megatron: str
    hf: Tuple[str, ...]
    transform: Transform


def expand(table: Sequence[Row], num_layers: int) -> List[Expanded]:
    out = []
    for meg, hf, tr in table:
        blocks = range(num_layers) if "{j}" in meg else [None]
        for j in blocks:
            fmt = {} if j is None else {"j": j}
            out.append(Expanded(meg.format(**fmt), tuple(h.format(**fmt) for h in hf), tr))
    return out


def hf_to_megatron(hf: Mapping[str, Tensor], v: VisionConfig, with_projector: bool = True) -> Dict[str, Tensor]:
    """HF ``visual.*`` tensors -> our full (TP=1) vision/projector tensors; KeyError lists what is missing."""
    rows = expand(vision_table(v, with_projector), v.num_layers)
    missing = sorted(h for r in rows for h in r.hf if h not in hf)
    if missing:
        raise KeyError(f"HF checkpoint lacks vision tensors: {missing}")
    return {r.megatron: r.transform.to_megatron([hf[h] for h in r.hf], v) for r in rows}


def megatron_to_hf(ours: Mapping[str, Tensor], v: VisionConfig, with_projector: bool = True) -> Dict[str, Tensor]:
    """Inverse of :func:`hf_to_megatron` (export)."""
    out = {}
    for r in expand(vision_table(v, with_projector), v.num_layers):
        out.update(zip(r.hf, r.transform.to_hf(ours[r.megatron], v)))
    return out

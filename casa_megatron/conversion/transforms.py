"""Typed, invertible tensor transforms between Hugging Face and megatron layouts.

Every transform maps the HF tensors of one mapping row to one megatron tensor and back:
``to_megatron(hf_tensors) -> tensor`` and ``to_hf(tensor) -> hf_tensors``, with
``to_hf(to_megatron(x)) == x``. Import and export use the same objects, so an export is the
import inverted by construction. Transforms only reshape, concatenate and index; they run on
``meta`` tensors too, which is how the engine learns the HF shapes a parameter expects
(``expected_hf_shapes``) from the safetensors headers, before reading any data.

Megatron layouts (TP=1; TP sharding is the checkpoint's business):
* fused QKV: rows grouped per KV head, ``[ng, (np/ng) q heads + k + v, hn]``;
* SwiGLU ``linear_fc1``: ``[gate; up]`` stacked on rows;
* padded vocabulary: ``padded_vocab_size`` rows, the extra ones zero;
* padded vision MLP width: ``padded_ffn_hidden_size`` units, the extra ones zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class Transform:
    """Identity: one HF tensor is the megatron tensor."""

    arity = 1

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        return t

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        return [tensor]

    def expected_hf_shapes(self, megatron_shape: Sequence[int]) -> List[Tuple[int, ...]]:
        meta = torch.empty(tuple(megatron_shape), device="meta")
        return [tuple(t.shape) for t in self.to_hf(meta)]

    def __repr__(self) -> str:
        return type(self).__name__


IDENTITY = Transform()


def rotary_half_permutation(head_dim: int) -> Tensor:
    """Row order that turns an interleaved-RoPE head (pairs (0,1), (2,3), ...) into a
    rotate-half head (pairs (i, i + d/2)): new row i = old row 2i, new row i + d/2 = old 2i+1.
    Applying it to both the Q and K rows of every head leaves q.k unchanged and makes
    megatron's rotate-half RoPE compute exactly the interleaved rotation."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


@dataclass(frozen=True, repr=False)
class QKV(Transform):
    """Separate ``q_proj``, ``k_proj``, ``v_proj`` (weight or bias) <-> megatron's grouped QKV.

    ``interleaved_rope``: the HF family rotates interleaved pairs (Helium); Q and K rows are
    permuted per head to megatron's rotate-half layout on import and back on export.
    """

    heads: int
    groups: int
    head_dim: int
    interleaved_rope: bool = False
    arity = 3

    def _permute(self, t: Tensor, n_heads: int, inverse: bool) -> Tensor:
        if not self.interleaved_rope:
            return t
        perm = rotary_half_permutation(self.head_dim)
        if inverse:
            perm = torch.argsort(perm)
        rest = t.shape[1:]
        return t.reshape(n_heads, self.head_dim, *rest)[:, perm].reshape(n_heads * self.head_dim, *rest)

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        q, k, v = hf
        q, k = self._permute(q, self.heads, False), self._permute(k, self.groups, False)
        rest = q.shape[1:]
        per = self.heads // self.groups
        q = q.reshape(self.groups, per * self.head_dim, *rest)
        k = k.reshape(self.groups, self.head_dim, *rest)
        v = v.reshape(self.groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        rest = tensor.shape[1:]
        per = self.heads // self.groups
        grouped = tensor.reshape(self.groups, (per + 2) * self.head_dim, *rest)
        q, k, v = torch.split(grouped, [per * self.head_dim, self.head_dim, self.head_dim], dim=1)
        q = q.reshape(self.heads * self.head_dim, *rest)
        k = k.reshape(self.groups * self.head_dim, *rest)
        v = v.reshape(self.groups * self.head_dim, *rest)
        return [self._permute(q, self.heads, True), self._permute(k, self.groups, True), v]

    def __repr__(self) -> str:
        rope = ", interleaved_rope" if self.interleaved_rope else ""
        return f"QKV(heads={self.heads}, groups={self.groups}, head_dim={self.head_dim}{rope})"


@dataclass(frozen=True, repr=False)
class FusedQKV(Transform):
    """One HF tensor ``[q; k; v]`` (ViT ``attn.qkv``) <-> megatron's grouped QKV."""

    heads: int
    groups: int
    head_dim: int

    def _qkv(self) -> QKV:
        return QKV(self.heads, self.groups, self.head_dim)

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        q_rows, kv_rows = self.heads * self.head_dim, self.groups * self.head_dim
        return self._qkv().to_megatron(torch.split(t, [q_rows, kv_rows, kv_rows], dim=0))

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        return [torch.cat(self._qkv().to_hf(tensor), dim=0)]

    def __repr__(self) -> str:
        return f"FusedQKV(heads={self.heads}, groups={self.groups}, head_dim={self.head_dim})"


@dataclass(frozen=True, repr=False)
class ZeroPad(Transform):
    """A tensor zero-padded along ``dim`` from ``size`` to ``padded`` on import, sliced back on
    export (no copy when nothing is padded). The padded entries are exact no-ops of the model
    (zero vocabulary rows with masked logits; zero MLP units, see the subclasses)."""

    size: int
    padded: int
    dim: int = 0

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        extra = self.padded - t.shape[self.dim]
        if extra == 0:  # nothing to pad: no copy of a 600 MB embedding
            return t
        pad = [0, 0] * (t.dim() - 1 - self.dim) + [0, extra]
        return torch.nn.functional.pad(t, pad)

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        return [tensor.narrow(self.dim, 0, self.size)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size} -> {self.padded}, dim={self.dim})"


@dataclass(frozen=True, repr=False)
class PadVocab(ZeroPad):
    """Embedding / LM head rows: zero-padded from ``vocab_size`` to ``padded_vocab_size`` on
    import, sliced back on export."""

    def __repr__(self) -> str:
        return f"PadVocab({self.size} -> {self.padded})"


@dataclass(frozen=True, repr=False)
class PadFFN(ZeroPad):
    """An MLP width padded with zero units (``model.vision.ffn_pad_multiple``: Qwen2.5-VL's 3420
    -> 3424 so that it splits over TP = 8). ``dim`` 0: the rows of a gate / up weight or bias;
    ``dim`` 1: the columns of the down projection. Zero gate, up and down entries make the
    extra units exact no-ops with zero gradients (docs/architecture.md, "Vision encoders").

    Export slices the padding off, which is exact only while the padded gate / up rows are zero:
    a unit whose rows are not (a padded encoder built from scratch, or an adapter that moved
    them) computes something the HF MLP has no room for, so those rows are checked and the
    export refused rather than silently changed. The down projection's padded columns read
    those units' zero outputs, so what they hold changes nothing and is not checked."""

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        if self.dim == 0 and tensor.device.type != "meta" and tensor.shape[0] > self.size:
            padding = tensor.narrow(0, self.size, tensor.shape[0] - self.size)
            if padding.any():
                raise ValueError(f"{int((padding != 0).sum())} non-zero entries in the padded MLP units "
                                 f"{self.size}..{tensor.shape[0] - 1}: the model uses units the HF MLP "
                                 f"({self.size} wide) cannot hold")
        return super().to_hf(tensor)

    def __repr__(self) -> str:
        return f"PadFFN({self.size} -> {self.padded}, dim={self.dim})"


@dataclass(frozen=True, repr=False)
class GatedMLP(Transform):
    """``gate_proj``, ``up_proj`` (weight or bias) <-> SwiGLU ``linear_fc1`` = ``[gate; up]``.

    ``pad``: each half padded to the MLP's padded width first (vision MLPs; None: no padding)."""

    pad: Optional[PadFFN] = None
    arity = 2

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        gate, up = (self.pad.to_megatron([t]) if self.pad else t for t in hf)
        return torch.cat([gate, up], dim=0)

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        halves = torch.chunk(tensor, 2, dim=0)
        return [self.pad.to_hf(h)[0] if self.pad else h for h in halves]

    def __repr__(self) -> str:
        return f"GatedMLP(pad={self.pad!r})" if self.pad else "GatedMLP"


@dataclass(frozen=True, repr=False)
class Conv3dToLinear(Transform):
    """Qwen2.5-VL's patch embedding ``Conv3d(C, hv, kernel=(T, p, p))`` weight
    ``[hv, C, T, p, p]`` <-> a linear over flattened patches ``[hv, C*T*p*p]`` (same order
    as the processor flattens a patch, so the linear equals the convolution)."""

    in_channels: int
    temporal_patch: int
    patch: int

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        return t.reshape(t.shape[0], -1)

    def to_hf(self, tensor: Tensor) -> List[Tensor]:
        return [tensor.reshape(tensor.shape[0], self.in_channels, self.temporal_patch, self.patch, self.patch)]

    def __repr__(self) -> str:
        return f"Conv3dToLinear(C={self.in_channels}, T={self.temporal_patch}, p={self.patch})"

"""Window attention with Transformer Engine's ``DotProductAttention`` (GPU path).

TE's ``thd`` format takes the same packed description as flash-attn varlen:
each CASA window is one "sequence" with its own ``cu_seqlens_q`` (text) and
``cu_seqlens_kv`` (images + text). ``padding_causal_bottom_right`` gives the
CASA mask; plain ``padding`` gives vanilla cross-attention. TE picks cuDNN
fused attention or flash-attn internally.

``DotProductAttention`` is an ``nn.Module`` holding backend-selection and FP8
state, so building one per call would be wasteful and would reset that state;
a small cache keyed by the static configuration hands out one module per
``(hq, hkv, d, mask type, scale)``.

This path needs a CUDA GPU, fp16/bf16 tensors and transformer-engine; it is
not exercised by the CPU test suite (the GPU tests compare it to the torch
backend).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from casa_megatron.model.kernels.base import default_scale, nothing_to_attend, require_cuda_half, zero_keyless_windows


def _import_te_dpa():
    try:
        from transformer_engine.pytorch import DotProductAttention
    except ImportError as err:
        raise ImportError(
            "window attention backend 'te' needs transformer-engine[pytorch]; "
            "use backend='torch' or 'flash' instead"
        ) from err
    return DotProductAttention


@functools.lru_cache(maxsize=64)
def get_te_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, attn_mask_type: str, softmax_scale: float
) -> torch.nn.Module:
    """One cached TE ``DotProductAttention`` per static configuration.

    ``attention_type="cross"`` because queries and keys have different
    lengths per window; dropout is off (CASA applies none inside the kernel).
    """
    DotProductAttention = _import_te_dpa()
    try:
        module = DotProductAttention(
            num_attention_heads=num_heads,
            kv_channels=head_dim,
            num_gqa_groups=num_kv_heads,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type=attn_mask_type,
            attention_type="cross",
            softmax_scale=softmax_scale,
        )
    except TypeError as err:  # very old TE without softmax_scale / thd
        raise ImportError(
            "installed transformer-engine is too old for CASA windows: DotProductAttention must "
            f"accept qkv_format='thd' and softmax_scale ({err})"
        ) from err
    return module


def te_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_kv: int,
    *,
    causal_bottom_right: bool,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """GPU path: TE ``DotProductAttention`` in ``thd`` format. q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d].

    Queries of windows without keys are zeroed afterwards so that vanilla
    cross-attention does not depend on how a TE backend treats empty
    sequences.
    """
    require_cuda_half("te", q)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    empty = nothing_to_attend(q, k, v, max_seqlen_kv)
    if empty is not None:
        return empty
    mask_type = "padding_causal_bottom_right" if causal_bottom_right else "padding"
    module = get_te_attention(hq, hkv, d, mask_type, default_scale(d, softmax_scale))
    out = module(
        q.contiguous(),  # [tq, hq, d]
        k.to(q.dtype).contiguous(),  # [tk, hkv, d]
        v.to(q.dtype).contiguous(),  # [tk, hkv, d]
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        cu_seqlens_kv=cu_seqlens_kv.to(torch.int32),
        max_seqlen_q=int(max_seqlen_q),
        max_seqlen_kv=int(max_seqlen_kv),
        attn_mask_type=mask_type,
    )  # [tq, hq * d]
    out = out.view(tq, hq, d)  # [tq, hq, d]
    return zero_keyless_windows(out, cu_seqlens_q, cu_seqlens_kv)

"""Packed window attention: one interface, four backends.

CASA layers describe their attention as a list of independent windows in the
varlen ("thd") layout; packed LM self-attention does the same with one window
per packed sample (``model/packed_attention.py``). :func:`window_attention`
runs it with flash-attn, Transformer Engine, PyTorch's flash varlen or plain
torch, so model code never branches on what is installed. The backends are
imported lazily: only the torch one is needed on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from casa_megatron.model.kernels.base import (
    BACKENDS,
    check_window_inputs,
    flash_available,
    resolve_backend,
    te_available,
    torch_varlen_available,
)
from casa_megatron.model.kernels.torch_window import torch_window_attention

__all__ = [
    "BACKENDS",
    "window_attention",
    "torch_window_attention",
    "flash_available",
    "te_available",
    "torch_varlen_available",
    "resolve_backend",
]


def window_attention(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over packed windows. q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d] in q's dtype.

    For each window ``w``, queries ``q[cu_q[w]:cu_q[w+1]]`` attend to keys
    ``k[cu_kv[w]:cu_kv[w+1]]``. With ``causal_bottom_right`` query ``i`` of a
    window with ``nq`` queries and ``nk`` keys sees keys ``j <= i + nk - nq``
    (CASA: images first, then causal text). Queries that see no key (e.g.
    imageless windows in vanilla cross-attention) output exact zeros with
    zero, finite gradients. ``hq`` must be a multiple of ``hkv`` (GQA: query
    head ``h`` uses kv head ``h // (hq // hkv)``).

    backend: "torch" (portable, differentiable, pads windows), "flash"
    (flash-attn varlen, CUDA fp16/bf16), "te" (Transformer Engine thd, CUDA
    fp16/bf16), "torch_varlen" (``torch.nn.attention.varlen``, CUDA fp16/bf16)
    or "auto" (flash, then te, then torch_varlen where applicable, else torch;
    the choice is logged once).
    """
    check_window_inputs(q, k, v, cu_seqlens_q, cu_seqlens_kv)
    chosen = resolve_backend(backend, q)
    kwargs = dict(causal_bottom_right=causal_bottom_right, softmax_scale=softmax_scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv)
    if chosen == "flash":
        from casa_megatron.model.kernels.flash_window import flash_window_attention

        return flash_window_attention(*args, **kwargs)
    if chosen == "te":
        from casa_megatron.model.kernels.te_window import te_window_attention

        return te_window_attention(*args, **kwargs)
    if chosen == "torch_varlen":
        from casa_megatron.model.kernels.torch_varlen import torch_varlen_window_attention

        return torch_varlen_window_attention(*args, **kwargs)
    return torch_window_attention(*args, **kwargs)

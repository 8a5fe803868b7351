"""Window attention with flash-attn's varlen kernel (GPU path).

CASA windows map one-to-one onto flash-attn varlen "sequences": queries are
the window's text, keys are ``[images, text]`` of the window. flash-attn
>= 2.1 aligns the causal mask to the bottom-right corner when
``seqlen_q != seqlen_k``, which is exactly "all images + text up to me".
Older versions align it top-left and would silently hide image keys, so they
are rejected. GQA is handled natively by the kernel.

This path needs a CUDA GPU, fp16/bf16 tensors and flash-attn installed; it is
not exercised by the CPU test suite (the GPU tests compare it to the torch
backend).
"""

from __future__ import annotations

from typing import Optional

import torch

from casa_megatron.model.kernels.base import nothing_to_attend, require_cuda_half, zero_keyless_windows

_MIN_FLASH_VERSION = (2, 1)


def _import_flash_varlen():
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "window attention backend 'flash' needs flash-attn >= 2.1 (pip install flash-attn); "
            "use backend='torch' or 'te' instead"
        ) from err
    version = getattr(flash_attn, "__version__", "0.0")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < _MIN_FLASH_VERSION:
        raise ImportError(
            f"flash-attn {version} aligns the causal mask top-left; CASA needs the bottom-right "
            "alignment of flash-attn >= 2.1"
        )
    return flash_attn_varlen_func


def flash_window_attention(
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
    """GPU path: ``flash_attn_varlen_func`` over packed windows. q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d].

    Queries of windows without keys (imageless windows in vanilla
    cross-attention) are set to exactly zero afterwards; flash-attn already
    writes zeros there, the explicit step just makes the contract independent
    of kernel version.
    """
    require_cuda_half("flash", q)
    flash_attn_varlen_func = _import_flash_varlen()
    empty = nothing_to_attend(q, k, v, max_seqlen_kv)
    if empty is not None:
        return empty
    out = flash_attn_varlen_func(
        q,  # [tq, hq, d]
        k.to(q.dtype),  # [tk, hkv, d]
        v.to(q.dtype),  # [tk, hkv, d]
        cu_seqlens_q.to(torch.int32),
        cu_seqlens_kv.to(torch.int32),
        int(max_seqlen_q),
        int(max_seqlen_kv),
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=causal_bottom_right,
    )  # [tq, hq, d]
    return zero_keyless_windows(out, cu_seqlens_q, cu_seqlens_kv)

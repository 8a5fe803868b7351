"""Window attention with PyTorch's own flash varlen kernel (``torch.nn.attention.varlen``).

Why it is here: it needs no extra package -- any CUDA build of torch >= 2.10 has it, including
the GPU machines' torch 2.11 where flash-attn (source-only) and Transformer Engine (a 277 MB
wheel plus an extension built on the machine) may be missing.

Causal alignment (read from torch 2.13's ``torch/nn/attention/varlen.py`` and ``bias.py``):
``varlen_attn`` calls ``aten._flash_attention_forward`` -- the flash-attn 2 kernels vendored in
PyTorch -- with ``is_causal`` and ``window_size=(-1, 0)``. flash-attn >= 2.1 aligns the causal
mask to the bottom-right corner when a sequence has more keys than queries, and PyTorch's
``CausalBias`` relies on exactly that ("Flash accepts causal = True and for this particular op
it means lower right", ``bias.py``). Bottom-right is what CASA needs (images first, then causal
text), so the same call serves CASA windows and packed self-attention (where queries and keys
coincide and both alignments agree). Not yet checked on a GPU: ``benchmarks/gpu_check.py``
part (a) compares it with the float32 torch reference, causal and not, forward and backward,
with more keys than queries.

API drift: torch 2.10 spelled causality ``is_causal=True`` and had no GQA flag; 2.11 (the lent
GPU machines') uses ``window_size=(-1, 0)`` and ``scale`` without a GQA flag; 2.13 adds ``enable_gqa``. The call is built from the installed signature;
without ``enable_gqa`` the key/value heads are repeated, without ``scale`` queries are
pre-scaled. On CPU the kernel does not exist (``NotImplementedError`` from
``aten::_flash_attention_forward`` on torch 2.13 CPU), so this backend refuses CPU tensors.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from casa_megatron.model.kernels.base import default_scale, nothing_to_attend, require_cuda_half, zero_keyless_windows


@functools.lru_cache(maxsize=1)
def _varlen_api():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise ImportError(
            f"window attention backend 'torch_varlen' needs torch >= 2.10 "
            f"(torch.nn.attention.varlen); this is torch {torch.__version__}"
        ) from err
    params = set(inspect.signature(varlen_attn).parameters)
    return varlen_attn, params


def torch_varlen_window_attention(
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
    """GPU path: ``torch.nn.attention.varlen.varlen_attn``. q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d]."""
    require_cuda_half("torch_varlen", q)  # its flash kernel has no CPU implementation
    varlen_attn, params = _varlen_api()
    tq, hq, d = q.shape
    empty = nothing_to_attend(q, k, v, max_seqlen_kv)
    if empty is not None:
        return empty
    scale = default_scale(d, softmax_scale)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if k.shape[1] != hq and "enable_gqa" not in params:
        k = k.repeat_interleave(hq // k.shape[1], dim=1)  # [tk, hq, d]
        v = v.repeat_interleave(hq // v.shape[1], dim=1)
    pad = (-d) % 8  # the flash kernel wants head_dim % 8 == 0; zero columns change no score
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * (d + pad) ** 0.5)  # the kernel's default scale is 1/sqrt(head_dim)
    if k.shape[1] != hq:
        kwargs["enable_gqa"] = True
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal_bottom_right else (-1, -1)
    else:
        kwargs["is_causal"] = causal_bottom_right
    out = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(),  # [tq, hq, d'], [tk, hkv, d']
        cu_seqlens_q.to(torch.int32), cu_seqlens_kv.to(torch.int32),
        int(max_seqlen_q), int(max_seqlen_kv), **kwargs,
    )  # [tq, hq, d']
    if pad:
        out = out[..., :d]
    return zero_keyless_windows(out, cu_seqlens_q, cu_seqlens_kv)

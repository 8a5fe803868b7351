"""Portable window attention on top of ``torch.nn.functional.scaled_dot_product_attention``.

Runs on CPU and GPU and is differentiable, which makes it the reference
backend for tests and the fallback when no fused varlen kernel applies. It pads
every window to ``max_seqlen``. In general it builds a ``[W, max_q, max_kv]``
mask: fine for CASA windows and tests, not meant for long-context training.

Causal windows whose queries are their keys (packed LM self-attention: one
window per packed sample, ``cu_seqlens_q`` is ``cu_seqlens_kv``) take a
mask-free path: SDPA's own ``is_causal`` on the padded windows. Padding sits at
the end of each window, so a real query ``i < n`` only ever sees keys
``j <= i < n``; the padded rows are discarded. No tensor quadratic in the
sequence is allocated (SDPA's CPU flash kernel works in blocks), which is what
lets the CPU path drop the dense ``[b, 1, s, s]`` mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from casa_megatron.model.kernels.base import default_scale, query_window_ids


def _local_index(cu_seqlens: torch.Tensor, total: int):
    """Window id and offset within the window of each packed token."""
    win = query_window_ids(cu_seqlens, total)  # [t]
    local = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.to(torch.long)[win]  # [t]
    return win, local


def torch_window_attention(
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
    """Packed window attention via padding + SDPA. q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d].

    Rows that may see no key at all (keyless windows, padded query slots) get a
    dummy all-visible mask so SDPA stays finite, and their output is then
    replaced by zeros; since the upstream gradient of those rows is zero they
    contribute nothing to dK/dV.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    dtype = q.dtype
    k, v = k.to(dtype), v.to(dtype)
    num_windows = cu_seqlens_q.numel() - 1
    max_q, max_kv = max(int(max_seqlen_q), 1), max(int(max_seqlen_kv), 1)
    device = q.device
    if tq == 0 or num_windows == 0:
        return q.new_zeros(tq, hq, d) + 0 * (k.sum() + v.sum())  # keep the graph connected
    if causal_bottom_right and _same_windows(cu_seqlens_q, cu_seqlens_kv):
        return _causal_self_attention(q, k, v, cu_seqlens_q, max_q, default_scale(d, softmax_scale))

    # --- pad into [W, L, h, d] ----------------------------------------------------
    win_q, loc_q = _local_index(cu_seqlens_q, tq)  # [tq], [tq]
    win_k, loc_k = _local_index(cu_seqlens_kv, tk)  # [tk], [tk]
    q_pad = q.new_zeros(num_windows, max_q, hq, d).index_put((win_q, loc_q), q)  # [W, Lq, hq, d]
    k_pad = k.new_zeros(num_windows, max_kv, hkv, d).index_put((win_k, loc_k), k)  # [W, Lk, hkv, d]
    v_pad = v.new_zeros(num_windows, max_kv, hkv, d).index_put((win_k, loc_k), v)  # [W, Lk, hkv, d]
    q_pad = q_pad.transpose(1, 2)  # [W, hq, Lq, d]
    k_pad = k_pad.transpose(1, 2)  # [W, hkv, Lk, d]
    v_pad = v_pad.transpose(1, 2)  # [W, hkv, Lk, d]
    if hq != hkv:  # GQA: query head h uses kv head h // (hq // hkv), as in flash-attn
        k_pad = k_pad.repeat_interleave(hq // hkv, dim=1)  # [W, hq, Lk, d]
        v_pad = v_pad.repeat_interleave(hq // hkv, dim=1)  # [W, hq, Lk, d]

    # --- mask [W, 1, Lq, Lk] ------------------------------------------------------
    n_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.long)[:, None, None]  # [W, 1, 1]
    n_k = (cu_seqlens_kv[1:] - cu_seqlens_kv[:-1]).to(torch.long)[:, None, None]  # [W, 1, 1]
    i = torch.arange(max_q, device=device)[None, :, None]  # [1, Lq, 1]
    j = torch.arange(max_kv, device=device)[None, None, :]  # [1, 1, Lk]
    mask = j < n_k  # [W, 1, Lk]
    if causal_bottom_right:
        mask = mask & (j <= i + (n_k - n_q))  # [W, Lq, Lk]
    mask = mask.expand(num_windows, max_q, max_kv)
    row_has_key = mask.any(-1)  # [W, Lq]
    mask = mask | ~row_has_key[..., None]  # keep SDPA finite on rows we discard
    out = F.scaled_dot_product_attention(
        q_pad, k_pad, v_pad, attn_mask=mask[:, None], scale=default_scale(d, softmax_scale)
    )  # [W, hq, Lq, d]
    out = out.transpose(1, 2)  # [W, Lq, hq, d]

    # --- unpad and zero rows without keys ----------------------------------------
    out = out[win_q, loc_q]  # [tq, hq, d]
    keep = row_has_key[win_q, loc_q]  # [tq]
    return torch.where(keep[:, None, None], out, torch.zeros((), dtype=dtype, device=device))


def _same_windows(cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor) -> bool:
    if cu_seqlens_q is cu_seqlens_kv:
        return True
    if cu_seqlens_q.is_cuda:  # comparing values would cost a device sync
        return False
    return torch.equal(cu_seqlens_q, cu_seqlens_kv)


def _causal_self_attention(q, k, v, cu_seqlens, max_len: int, scale: float) -> torch.Tensor:
    """Windows with nq == nk, causal: q [t, hq, d], k/v [t, hkv, d] -> [t, hq, d], no mask."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    num_windows = cu_seqlens.numel() - 1
    win, loc = _local_index(cu_seqlens, t)  # [t], [t]
    q_pad = q.new_zeros(num_windows, max_len, hq, d).index_put((win, loc), q).transpose(1, 2)  # [W, hq, L, d]
    k_pad = k.new_zeros(num_windows, max_len, hkv, d).index_put((win, loc), k).transpose(1, 2)  # [W, hkv, L, d]
    v_pad = v.new_zeros(num_windows, max_len, hkv, d).index_put((win, loc), v).transpose(1, 2)  # [W, hkv, L, d]
    if hq != hkv:
        k_pad = k_pad.repeat_interleave(hq // hkv, dim=1)  # [W, hq, L, d]
        v_pad = v_pad.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, is_causal=True, scale=scale)  # [W, hq, L, d]
    return out.transpose(1, 2)[win, loc]  # [t, hq, d]

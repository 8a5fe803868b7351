"""Portable window attention on top of ``torch.nn.functional.scaled_dot_product_attention``.

Runs on CPU and GPU and is differentiable, which makes it the reference
backend for tests and the fallback when neither flash-attn nor Transformer
Engine applies. It pads every window to ``max_seqlen`` so it costs
``O(W * max_q * max_kv)`` memory for the mask and scores: fine for tests and
small batches, not meant for long-context training.
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

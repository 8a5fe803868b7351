"""CPU emulators of the GPU attention kernels, written from their documented contracts (float64,
dense, per sequence: bottom-right causal alignment, GQA groups, default scale ``1/sqrt(head_dim)``,
zeros for a query with no visible key), asserting the contracts' preconditions (int32
cu_seqlens, equal dtypes, contiguous inputs, head_dim % 8 for torch's kernel). They let the code
around a GPU-only kernel run in CPU tests; whether the real kernels honour the contract is
checked on a GPU (``benchmarks/gpu_check.py`` part (a))."""

from __future__ import annotations

import math

import torch


def _contract_attention(q, k, v, cu_q, cu_k, scale, causal, gqa):
    """Dense per-sequence attention with the flash contract. q [tq, hq, d], k/v [tk, hkv, d]."""
    assert cu_q.dtype == cu_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq:
        assert gqa and hq % hkv == 0, f"{hq} query heads vs {hkv} key/value heads without GQA support"
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        if nq == 0 or nk == 0:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale  # [h, nq, nk]
        i = torch.arange(nq).unsqueeze(1)
        j = torch.arange(nk).unsqueeze(0)
        visible = (j <= i + nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool)  # bottom-right
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[qs] = torch.einsum("hqk,khd->qhd", probs, v[ks])
    return out


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert query.shape[-1] % 8 == 0, "head_dim must be a multiple of 8"
    assert window_size in ((-1, -1), (-1, 0)), window_size
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _contract_attention(query, key, value, cu_seq_q, cu_seq_k, scale, window_size == (-1, 0), enable_gqa)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11's spelling (the lent GPU machines' torch; read from the 2.11.0 wheel's
    ``torch/nn/attention/varlen.py``): ``scale`` and ``window_size``, no GQA flag."""
    assert query.shape[-1] % 8 == 0, "head_dim must be a multiple of 8"
    assert window_size in ((-1, -1), (-1, 0)), window_size
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _contract_attention(query, key, value, cu_seq_q, cu_seq_k, scale, window_size == (-1, 0), gqa=False)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
    """torch 2.10's spelling: ``is_causal``, no ``scale``, no GQA."""
    assert query.shape[-1] % 8 == 0, "head_dim must be a multiple of 8"
    return _contract_attention(query, key, value, cu_seq_q, cu_seq_k, 1 / math.sqrt(query.shape[-1]),
                               is_causal, gqa=False)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    assert dropout_p == 0.0
    scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return _contract_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, gqa=True)


class DotProductAttention(torch.nn.Module):
    """Transformer Engine's module as our wrapper uses it: ``thd`` packed input, output
    ``[t, heads * head_dim]``, the mask type given at construction and again per call."""

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups, attention_dropout, qkv_format,
                 attn_mask_type, attention_type, softmax_scale):
        super().__init__()
        assert attention_dropout == 0.0 and qkv_format == "thd" and attention_type == "cross"
        assert attn_mask_type in ("padding", "padding_causal_bottom_right"), attn_mask_type
        self.heads, self.groups, self.d = num_attention_heads, num_gqa_groups, kv_channels
        self.mask_type, self.scale = attn_mask_type, softmax_scale

    def forward(self, q, k, v, *, qkv_format, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                attn_mask_type):
        assert qkv_format == "thd" and attn_mask_type == self.mask_type
        assert q.shape[1:] == (self.heads, self.d) and k.shape[1:] == (self.groups, self.d)
        out = _contract_attention(q, k, v, cu_seqlens_q, cu_seqlens_kv, self.scale,
                                  attn_mask_type == "padding_causal_bottom_right", gqa=True)
        return out.reshape(out.shape[0], -1)  # [t, h * d]

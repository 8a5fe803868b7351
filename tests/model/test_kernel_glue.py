"""The GPU kernel wrappers' own code, run on CPU against emulated kernels.

``torch_varlen``, ``flash`` and ``te`` call kernels that exist only on a GPU, so without a GPU the code
around the call -- argument conversion, the signature-dependent call of ``varlen_attn`` (torch
2.10 vs 2.13 spellings), GQA head repetition, head-dim padding with its compensating query
scale, keyless windows -- would first run in a lent GPU session. Here each kernel is replaced by
an emulator written from its documented contract (float64, dense, per sequence: bottom-right
causal alignment, GQA groups, default scale ``1/sqrt(head_dim)``, zeros for a query with no
visible key) that also asserts the contract's preconditions (int32 cu_seqlens, equal dtypes,
contiguous inputs, head_dim % 8 for torch's kernel). The wrapper must then equal the naive
reference of ``test_window_kernels.py``, forward and backward. Whether the real kernels honour
the contract is the GPU tests' job (part (a) of ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_window_kernels import CASES, _cu, _inputs, naive_windows

from casa_megatron.model.kernels import flash_window, te_window, torch_varlen


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


@pytest.fixture(autouse=True)
def _no_emulated_te_module_left_cached():
    """get_te_attention caches modules: none made from the emulator may outlive its test."""
    te_window.get_te_attention.cache_clear()
    yield
    te_window.get_te_attention.cache_clear()


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


def _emulated(monkeypatch, name):
    import inspect

    for module in (torch_varlen, flash_window, te_window):
        monkeypatch.setattr(module, "require_cuda_half", lambda *a: None)
    if name == "te":
        monkeypatch.setattr(te_window, "_import_te_dpa", lambda: DotProductAttention)
        return te_window.te_window_attention
    if name == "flash":
        monkeypatch.setattr(flash_window, "_import_flash_varlen", lambda: flash_attn_varlen_func)
        return flash_window.flash_window_attention
    fn = {"torch_varlen_2_13": varlen_attn_2_13, "torch_varlen_2_10": varlen_attn_2_10}[name]
    monkeypatch.setattr(torch_varlen, "_varlen_api", lambda: (fn, set(inspect.signature(fn).parameters)))
    return torch_varlen.torch_varlen_window_attention


@pytest.mark.parametrize("kernel", ["torch_varlen_2_13", "torch_varlen_2_10", "flash", "te"])
@pytest.mark.parametrize("head_dim", [8, 12])  # 12: torch's kernel needs padding to 16
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_wrapper_around_emulated_kernel_matches_naive(monkeypatch, kernel, head_dim, causal, case):
    attend = _emulated(monkeypatch, kernel)
    q_lens, kv_lens, hq, hkv = case
    q, k, v = _inputs(q_lens, kv_lens, hq, hkv, d=head_dim)
    for scale in (None, 0.3):
        out = attend(q, k, v, _cu(q_lens).long(), _cu(kv_lens).long(), max(q_lens), max(kv_lens),
                     causal_bottom_right=causal, softmax_scale=scale)  # int64 cu_seqlens: converted
        ref = naive_windows(q, k, v, q_lens, kv_lens, causal, scale=scale)
        assert out.shape == q.shape
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-10)


def test_torch_varlen_call_follows_the_installed_signature(monkeypatch):
    """What the wrapper passes: 2.13 gets window_size / scale / enable_gqa; 2.10 gets is_causal and
    repeated K/V heads (no GQA flag there)."""
    seen = {}

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen[fn.__name__] = (args[1].shape[1], sorted(kwargs))
            return fn(*args, **kwargs)
        wrapped.__wrapped__ = fn
        return wrapped

    import inspect

    monkeypatch.setattr(torch_varlen, "require_cuda_half", lambda *a: None)
    q, k, v = _inputs([3], [5], 4, 2, d=16)
    for fn in (varlen_attn_2_13, varlen_attn_2_10):
        monkeypatch.setattr(torch_varlen, "_varlen_api", lambda fn=fn: (spy(fn), set(inspect.signature(fn).parameters)))
        torch_varlen.torch_varlen_window_attention(q, k, v, _cu([3]), _cu([5]), 3, 5, causal_bottom_right=True)
    assert seen["varlen_attn_2_13"] == (2, ["enable_gqa", "scale", "window_size"])
    assert seen["varlen_attn_2_10"] == (4, ["is_causal"])

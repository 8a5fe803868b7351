"""The GPU kernel wrappers' own code, run on CPU against emulated kernels.

``torch_varlen``, ``flash`` and ``te`` call kernels that exist only on a GPU, so without a GPU the code
around the call -- argument conversion, the signature-dependent call of ``varlen_attn`` (torch
2.10, 2.11 -- the lent GPU machines' -- and 2.13 spellings), GQA head repetition, head-dim padding with its compensating query
scale, keyless windows -- would first run in a lent GPU session. Here each kernel is replaced by
an emulator written from its documented contract (float64, dense, per sequence: bottom-right
causal alignment, GQA groups, default scale ``1/sqrt(head_dim)``, zeros for a query with no
visible key) that also asserts the contract's preconditions (int32 cu_seqlens, equal dtypes,
contiguous inputs, head_dim % 8 for torch's kernel). The wrapper must then equal the naive
reference of ``test_window_kernels.py``, forward and backward. Whether the real kernels honour
the contract is the GPU tests' job (part (a) of ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import pytest
import torch
from support.kernel_emulators import (
    DotProductAttention, flash_attn_varlen_func, varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_13,
)
from test_window_kernels import CASES, _cu, _inputs, naive_windows

from casa_megatron.model.kernels import flash_window, te_window, torch_varlen


@pytest.fixture(autouse=True)
def _no_emulated_te_module_left_cached():
    """get_te_attention caches modules: none made from the emulator may outlive its test."""
    te_window.get_te_attention.cache_clear()
    yield
    te_window.get_te_attention.cache_clear()


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
    fn = {"torch_varlen_2_13": varlen_attn_2_13, "torch_varlen_2_11": varlen_attn_2_11,
          "torch_varlen_2_10": varlen_attn_2_10}[name]
    monkeypatch.setattr(torch_varlen, "_varlen_api", lambda: (fn, set(inspect.signature(fn).parameters)))
    return torch_varlen.torch_varlen_window_attention


@pytest.mark.parametrize("kernel", ["torch_varlen_2_13", "torch_varlen_2_11", "torch_varlen_2_10", "flash", "te"])
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
    """What the wrapper passes: 2.13 gets window_size / scale / enable_gqa; 2.11 (the lent GPU
    machines') window_size / scale and repeated K/V heads; 2.10 is_causal and repeated K/V heads
    (no GQA flag in either)."""
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
    for fn in (varlen_attn_2_13, varlen_attn_2_11, varlen_attn_2_10):
        monkeypatch.setattr(torch_varlen, "_varlen_api", lambda fn=fn: (spy(fn), set(inspect.signature(fn).parameters)))
        torch_varlen.torch_varlen_window_attention(q, k, v, _cu([3]), _cu([5]), 3, 5, causal_bottom_right=True)
    assert seen["varlen_attn_2_13"] == (2, ["enable_gqa", "scale", "window_size"])
    assert seen["varlen_attn_2_11"] == (4, ["scale", "window_size"])
    assert seen["varlen_attn_2_10"] == (4, ["is_causal"])

"""Window-attention kernel tests.

The torch backend is checked against a per-window float64 loop written from
the definition (query i of a window with nq queries and nk keys sees keys
j <= i + nk - nq). The flash-attn and Transformer Engine backends need a GPU;
their tests compare them with the torch backend and are skipped elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from casa_megatron.model.kernels import (
    flash_available,
    resolve_backend,
    te_available,
    torch_varlen_available,
    window_attention,
)

GPU_REASON = "needs a CUDA GPU (and flash-attn / transformer-engine)"


def naive_windows(q, k, v, q_lens, kv_lens, causal, scale=None):
    """Reference: explicit softmax for every query of every window, float64."""
    hq, d = q.shape[1], q.shape[2]
    rep = hq // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    outs, oq, ok = [], 0, 0
    for nq, nk in zip(q_lens, kv_lens):
        for i in range(nq):
            last = nk if not causal else min(nk, i + nk - nq + 1)  # keys [0, last)
            if last <= 0:
                outs.append(torch.zeros_like(q[oq + i]))
                continue
            heads = []
            for h in range(hq):
                kk, vv = k[ok : ok + last, h // rep], v[ok : ok + last, h // rep]
                p = torch.softmax((kk @ q[oq + i, h]) * scale, dim=0)
                heads.append(p @ vv)
            outs.append(torch.stack(heads))
        oq, ok = oq + nq, ok + nk
    return torch.stack(outs) if outs else q.new_zeros(0, hq, d)


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(q_lens, kv_lens, hq, hkv, d=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(n, h, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    return mk(sum(q_lens), hq), mk(sum(kv_lens), hkv), mk(sum(kv_lens), hkv)


CASES = [
    # (q_lens, kv_lens, hq, hkv): includes nq > nk, empty-key and empty-query windows
    ([3, 1, 4], [5, 1, 9], 4, 2),
    ([2, 3, 2], [0, 4, 2], 2, 2),
    ([4, 0, 3, 2], [2, 3, 0, 6], 4, 1),
    ([5], [5], 2, 1),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_naive(case, causal):
    q_lens, kv_lens, hq, hkv = case
    q, k, v = _inputs(q_lens, kv_lens, hq, hkv)
    out = window_attention(
        q, k, v, _cu(q_lens), _cu(kv_lens), max(q_lens), max(kv_lens),
        causal_bottom_right=causal, softmax_scale=0.3, backend="torch",
    )
    ref = naive_windows(q, k, v, q_lens, kv_lens, causal, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(g_out, g_ref):
        b = torch.zeros_like(a) if b is None else b
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_keyless_windows_are_exactly_zero_with_zero_grad():
    q_lens, kv_lens = [2, 3, 2], [0, 4, 0]
    q, k, v = _inputs(q_lens, kv_lens, 2, 2, dtype=torch.float32)
    out = window_attention(q, k, v, _cu(q_lens), _cu(kv_lens), 3, 4, causal_bottom_right=False, backend="torch")
    assert (out[:2] == 0).all() and (out[5:] == 0).all() and (out[2:5] != 0).any()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:2] == 0).all() and (q.grad[5:] == 0).all()


def test_output_dtype_follows_q():
    q, k, v = _inputs([3], [4], 2, 2, dtype=torch.float32)
    out = window_attention(q, k.double(), v.double(), _cu([3]), _cu([4]), 3, 4, causal_bottom_right=True, backend="torch")
    assert out.dtype == torch.float32 and out.shape == q.shape


def test_auto_is_torch_on_cpu_and_the_choice_is_logged_once(caplog, monkeypatch):
    from casa_megatron.model.kernels import base

    monkeypatch.setattr(base, "_LOGGED_CHOICES", set())
    with caplog.at_level("INFO", logger="casa_megatron.model.kernels.base"):
        for _ in range(3):
            assert resolve_backend("auto", torch.zeros(1, 1, 1)) == "torch"
            assert resolve_backend("auto", torch.zeros(1, 1, 1, dtype=torch.bfloat16)) == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "'torch'" in messages[0] and "not on a CUDA device" in messages[0]


def test_self_attention_windows_take_the_mask_free_path(monkeypatch):
    """Causal windows whose queries are their keys (packed samples) run SDPA's is_causal on the
    padded windows, with no mask at all, and still equal the float64 definition."""
    from casa_megatron.model.kernels import torch_window

    seen = []
    real = torch_window.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_window.F, "scaled_dot_product_attention", spy)
    lens = [5, 1, 7, 3]
    q, k, v = _inputs(lens, lens, 4, 2)
    cu = _cu(lens)
    out = window_attention(q, k, v, cu, cu, 7, 7, causal_bottom_right=True, backend="torch")
    torch.testing.assert_close(out, naive_windows(q, k, v, lens, lens, True), rtol=1e-10, atol=1e-10)
    other = window_attention(q, k, v, cu, _cu([5, 2, 6, 3]), 7, 7, causal_bottom_right=True, backend="torch")
    assert seen == [(True, True), (False, False)] and other.shape == out.shape


def test_torch_varlen_refuses_cpu_tensors_with_a_clear_error():
    q, k, v = torch.zeros(3, 2, 8, dtype=torch.bfloat16), torch.zeros(5, 2, 8), torch.zeros(5, 2, 8)
    cu_q, cu_kv = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="'torch_varlen' needs CUDA tensors"):
        window_attention(q, k, v, cu_q, cu_kv, 3, 5, causal_bottom_right=True, backend="torch_varlen")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="cuda-magic"), "unknown window-attention backend"),
        (dict(backend="flash"), "needs CUDA tensors"),
        (dict(backend="te"), "needs CUDA tensors"),
        (dict(hkv=3), r"multiple of key/value heads"),
        (dict(cu_q=[0, 2, 4]), r"cu_seqlens_q ends at 4 for 3 queries"),
        (dict(cu_kv=[0, 1]), r"1-D with one entry per window"),
        (dict(q_rank=2), r"packed \[tokens, heads, head_dim\]"),
    ],
)
def test_window_attention_errors(kwargs, match):
    hq, hkv = 4, kwargs.get("hkv", 2)
    q, k, v = torch.zeros(3, hq, 8), torch.zeros(5, hkv, 8), torch.zeros(5, hkv, 8)
    if kwargs.get("q_rank") == 2:
        q = q.flatten(1)
    cu_q = torch.tensor(kwargs.get("cu_q", [0, 1, 3]), dtype=torch.int32)
    cu_kv = torch.tensor(kwargs.get("cu_kv", [0, 2, 5]), dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        window_attention(q, k, v, cu_q, cu_kv, 2, 3, causal_bottom_right=True, backend=kwargs.get("backend", "torch"))


# ----------------------------------------------------------------------------- GPU backends
def _compare_with_torch(backend, causal):
    q_lens, kv_lens = [7, 1, 16, 5], [12, 3, 20, 5] if causal else [12, 0, 20, 5]
    q, k, v = _inputs(q_lens, kv_lens, 8, 2, d=64, dtype=torch.bfloat16, device="cuda")
    args = (_cu(q_lens, "cuda"), _cu(kv_lens, "cuda"), max(q_lens), max(kv_lens))
    outs, grads = [], []
    for name in (backend, "torch"):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = window_attention(qq, kk, vv, *args, causal_bottom_right=causal, backend=name)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([x.grad.float() for x in (qq, kk, vv)])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_available()), reason=GPU_REASON)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_backend_matches_torch(causal):
    _compare_with_torch("flash", causal)


@pytest.mark.skipif(not (torch.cuda.is_available() and te_available()), reason=GPU_REASON)
@pytest.mark.parametrize("causal", [True, False])
def test_te_backend_matches_torch(causal):
    _compare_with_torch("te", causal)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch_varlen_available()),
                    reason="needs a CUDA GPU and torch >= 2.10 (torch.nn.attention.varlen)")
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_backend_matches_torch(causal):
    """Includes windows with more keys than queries: the causal mask must be bottom-right."""
    _compare_with_torch("torch_varlen", causal)

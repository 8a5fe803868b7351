"""The remote code's attention: the bottom-right causal kernel against a dense float64 reference,
on CPU (SDPA) and, where a GPU exists, torch's flash varlen kernel."""

from __future__ import annotations

import pytest
import torch

from casa_megatron.hf.remote.layers_casa import attend


def _reference(q, k, v, scale):
    n, length = q.shape[1], k.shape[1]
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0).double(), v.repeat_interleave(rep, 0).double()
    scores = q.double() @ k.transpose(1, 2) * scale  # [H, n, L]
    allowed = torch.ones(n, length, dtype=torch.bool).tril(diagonal=length - n)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1).reshape(n, -1)


@pytest.mark.parametrize("n,length", [(1, 1), (1, 9), (4, 4), (3, 11)])
def test_bottom_right_causal_cpu(n, length):
    g = torch.Generator().manual_seed(n * 100 + length)
    q, k, v = torch.randn(4, n, 8, generator=g), torch.randn(2, length, 8, generator=g), torch.randn(2, length, 8, generator=g)
    torch.testing.assert_close(attend(q, k, v, 8 ** -0.5).double(), _reference(q, k, v, 8 ** -0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen path needs a CUDA GPU; none on the CPU "
                    "machines, so this path has not been run yet")
@pytest.mark.parametrize("n,length", [(1, 9), (3, 11), (64, 64)])
def test_flash_varlen_matches_reference_gpu(n, length):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, n, 64, generator=g), torch.randn(2, length, 64, generator=g), torch.randn(2, length, 64, generator=g)
    out = attend(*(t.cuda().bfloat16() for t in (q, k, v)), 64 ** -0.5).float().cpu()
    torch.testing.assert_close(out.double(), _reference(q, k, v, 64 ** -0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", ["2.13", "2.11", "2.10"])
@pytest.mark.parametrize("n,length,kv_heads", [(1, 9, 2), (3, 11, 2), (4, 4, 4), (5, 12, 1)])
def test_gpu_branch_around_emulated_varlen_kernel(monkeypatch, kernel, n, length, kv_heads):
    """The remote code's GPU branch (call built from the installed ``varlen_attn`` signature: torch
    2.13's scale / window_size / enable_gqa, 2.11's (the lent GPU machines') scale / window_size
    without GQA, or 2.10's is_causal without GQA or scale) run on CPU around an emulator of the
    kernel's documented contract (support/kernel_emulators.py)."""
    import inspect

    from support.kernel_emulators import varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_13

    from casa_megatron.hf.remote import layers_casa

    fn = {"2.13": varlen_attn_2_13, "2.11": varlen_attn_2_11, "2.10": varlen_attn_2_10}[kernel]
    calls = []

    def spy(*args, **kwargs):
        calls.append(sorted(kwargs))
        return fn(*args, **kwargs)

    monkeypatch.setattr(layers_casa, "_varlen_kernel", lambda q: (spy, frozenset(inspect.signature(fn).parameters)))
    g = torch.Generator().manual_seed(n * 100 + length)
    q = torch.randn(4, n, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(kv_heads, length, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out = attend(q, k, v, 0.3)
    assert calls == [["enable_gqa", "scale", "window_size"] if kernel == "2.13" and kv_heads != 4
                     else ["scale", "window_size"] if kernel in ("2.13", "2.11") else ["is_causal"]]
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.3), rtol=1e-10, atol=1e-10)

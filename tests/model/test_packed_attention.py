"""Packed LM self-attention (cu_seqlens per packed sample, no dense mask).

Equality with the dense-mask path at TP=1, TP=2 (+SP) and PP=2 for every fusion lives in
tests/model/test_vlm_parallel.py (its reference runs the dense mask). Here: the cu_seqlens
bookkeeping, the refusals, and that no tensor quadratic in the row length is allocated
anywhere in a forward + backward of the whole model (the dense path, run as a control, does).
"""

from __future__ import annotations

import pytest
import torch
from support.dist import run_distributed
from support.vlm import VOCAB, small_model_config

from casa_megatron.model.batch import VLMBatch


def test_cu_seqlens_open_a_sample_at_every_row_start_and_sample_start():
    from casa_megatron.model.packed_attention import ROW_PACKED, packed_seq_params, segment_starts

    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 4] = True  # row 0: samples [0, 4), [4, 6); row 1: one sample
    params = packed_seq_params(starts)
    assert params.qkv_format == ROW_PACKED
    assert params.cu_seqlens_q.tolist() == [0, 4, 6, 12] and params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
    # insertion's segment ids (-1 = padding, its own segment)
    seg = torch.tensor([[0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, -1]])
    assert packed_seq_params(segment_starts(seg)).cu_seqlens_q.tolist() == [0, 2, 4, 6, 11, 12]


def _core(**kwargs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from casa_megatron.model.packed_attention import PackedCoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, attention_dropout=kwargs.pop("dropout", 0.0))
    return PackedCoreAttention(config, layer_number=1, **kwargs)


def test_core_attention_equals_per_sample_causal_sdpa_and_refuses_dense_masks():
    """q/k/v [s, b, heads, d] with GQA: every packed sample attends causally to itself only."""
    from casa_megatron.model.packed_attention import packed_seq_params

    s, b, d = 7, 2, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, h, d, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    starts = torch.zeros(b, s, dtype=torch.bool)
    starts[1, 3] = True
    out = _core()(q, k, v, None, packed_seq_params=packed_seq_params(starts))  # [s, b, 16]
    expected = torch.zeros(s, b, 4, d, dtype=torch.float64)
    for row, bounds in ((0, [(0, 7)]), (1, [(0, 3), (3, 7)])):
        for lo, hi in bounds:
            qq = q[lo:hi, row].transpose(0, 1)  # [heads, n, d]
            kk, vv = (x[lo:hi, row].transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))
            expected[lo:hi, row] = torch.nn.functional.scaled_dot_product_attention(
                qq, kk, vv, is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, expected.reshape(s, b, 4 * d), rtol=1e-12, atol=1e-12)
    whole_rows = _core()(q, k, v, None)  # no params: every row is one causal sequence
    torch.testing.assert_close(whole_rows[:, 0], out[:, 0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(whole_rows[3:, 1], out[3:, 1])
    with pytest.raises(ValueError, match="dense attention_mask"):
        _core()(q, k, v, torch.zeros(b, 1, s, s, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention dropout"):
        _core(dropout=0.1)


def test_non_causal_mode_is_full_attention_per_segment():
    """The vision encoders' mode: one row of patches, every segment (image / frame / window)
    attends to all of itself and nothing else."""
    from casa_megatron.model.packed_attention import segment_params

    n, d = 9, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 1, 4, d, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 2, 7, 9], dtype=torch.int32)
    out = _core(causal=False)(q, k, v, None, packed_seq_params=segment_params(cu))  # [n, 1, 16]
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[lo:hi, 0].transpose(0, 1) for x in (q, k, v))).transpose(0, 1) for lo, hi in ((0, 2), (2, 7), (7, 9))])
    torch.testing.assert_close(out, expected.reshape(n, 1, 4 * d), rtol=1e-12, atol=1e-12)
    causal = _core()(q, k, v, None, packed_seq_params=segment_params(cu))
    assert not torch.allclose(causal, out)


# --- no tensor quadratic in the row length ------------------------------------------------------
ROW, SAMPLES_PER_ROW, GRID = 384, 8, (2, 4)  # 48-token samples, one 2-token image each


def long_packed_batch(seed: int = 0) -> VLMBatch:
    g = torch.Generator().manual_seed(seed)
    b, per = 2, ROW // SAMPLES_PER_ROW
    n_img = b * SAMPLES_PER_ROW
    sample_starts = torch.zeros(b, ROW, dtype=torch.bool)
    sample_starts[:, ::per] = True
    return VLMBatch(
        input_ids=torch.randint(0, VOCAB, (b, ROW), generator=g),
        position_ids=(torch.arange(ROW) % per).repeat(b, 1),
        pixel_patches=torch.randn(n_img * GRID[0] * GRID[1], 3 * 14 * 14, generator=g),
        image_grid_hw=torch.tensor([GRID] * n_img),
        image_rows=torch.arange(b).repeat_interleave(SAMPLES_PER_ROW),
        image_positions=torch.arange(0, ROW, per).repeat(b),
        labels=torch.randint(0, VOCAB, (b, ROW), generator=g),
        loss_mask=torch.ones(b, ROW),
        sample_starts=sample_starts,
    )


def _largest_tensors(rank, world):
    from torch.utils._python_dispatch import TorchDispatchMode

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    class Recorder(TorchDispatchMode):
        """Every tensor an op returns (forward and backward run on this thread on CPU)."""

        def __init__(self):
            super().__init__()
            self.max_numel, self.largest, self.quadratic = 0, None, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    if t.numel() > self.max_numel:
                        self.max_numel, self.largest = t.numel(), (str(func), tuple(t.shape))
                    if sum(size >= ROW for size in t.shape) >= 2:
                        self.quadratic.append((str(func), tuple(t.shape)))
            return out

    initialize_parallel(1, 1, seed=0)
    batch = long_packed_batch()
    report = {}
    for mechanism in ("casa", "cross_attention", "insertion"):
        for reference in (False, True):
            config = small_model_config(mechanism=mechanism, image_kv_only=not reference)
            config.packed_attention = not reference
            model = build_vlm(config, ParallelConfig(), image_seq_length=2 * SAMPLES_PER_ROW)
            recorder = Recorder()
            with recorder:
                model(batch).mean().backward()
            report[(mechanism, reference)] = (recorder.max_numel, recorder.quadratic[:3], recorder.largest)
    return report


def test_no_tensor_quadratic_in_the_row_is_allocated():
    """Forward + backward of the whole model on rows of 384 tokens (8 packed samples): the packed
    path allocates no tensor with two axes as long as a row (a [b, 1, s, s] mask, [b*np, s, s]
    scores) and nothing as large as s*s (its largest tensor is the [s, b, vocab] logits); the
    dense path, the control, does both."""
    report, = run_distributed(_largest_tensors, world_size=1)
    for mechanism in ("casa", "cross_attention", "insertion"):
        packed_max, packed_quadratic, largest = report[(mechanism, False)]
        dense_max, dense_quadratic, _ = report[(mechanism, True)]
        assert packed_quadratic == [], (mechanism, packed_quadratic)
        assert dense_quadratic, mechanism  # the check can fail
        assert packed_max < ROW * ROW < dense_max, (mechanism, largest, dense_max)

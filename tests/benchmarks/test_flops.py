"""The attention term of the MFU FLOP count: visible (query, key) pairs equal a count made from the
definition (per packed sample, per CASA window, per insertion segment), and the GEMM term is
PyTorch's counter on a real step (the K/V-only saving shows in it: tests/model/test_kv_projection.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from support.vlm import IMAGE_SLOTS, random_batch, small_model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _definition_counts(batch):
    """Per row, a loop over positions: (self-attention pairs, CASA pairs, cross-attention pairs)."""
    from casa_megatron.model.vision import tokens_per_image

    b, s = batch.shape
    tokens = tokens_per_image(batch.image_grid_hw).tolist()
    sa = casa = cross = 0
    for r in range(b):
        sample_start = window_start = 0
        images_in_window = 0
        for p in range(s):
            new_sample = p == 0 or bool(batch.sample_starts[r, p])
            here = [t for k, t in enumerate(tokens)
                    if int(batch.image_rows[k]) == r and int(batch.image_positions[k]) == p]
            if new_sample:
                sample_start = p
            if new_sample or here:  # a window opens at a sample start and at an insertion point
                window_start, images_in_window = p, sum(here)
            sa += p - sample_start + 1
            casa += images_in_window + (p - window_start + 1)
            cross += images_in_window
    return sa, casa, cross


def test_attention_pairs_match_the_definition():
    from benchmarks.flops import attention_flops, attention_pairs

    batch = random_batch(2)
    sa, casa, cross = _definition_counts(batch)
    layers = 4
    got = attention_pairs(small_model_config(), batch, IMAGE_SLOTS)
    assert got == {"self_attention": layers * sa, "fusion": layers * casa}
    got = attention_pairs(small_model_config(mechanism="cross_attention", every_n=2), batch, IMAGE_SLOTS)
    assert got == {"self_attention": layers * sa, "fusion": 2 * cross}
    got = attention_pairs(small_model_config(placement="replace", every_n=2), batch, IMAGE_SLOTS)
    assert got == {"self_attention": 2 * sa, "fusion": 2 * casa}
    cfg = small_model_config()
    assert attention_flops(cfg, 10) == 12 * cfg.lm.head_dim * cfg.lm.num_attention_heads * 10


def test_insertion_pairs_are_causal_within_each_segment_of_the_combined_stream():
    from benchmarks.flops import attention_pairs
    from casa_megatron.model.insertion import build_insertion_layout
    from casa_megatron.model.vision import tokens_per_image

    batch = random_batch(2)
    b, s = batch.shape
    layout = build_insertion_layout(b, s, IMAGE_SLOTS, batch.image_rows, batch.image_positions,
                                    tokens_per_image(batch.image_grid_hw), batch.position_ids,
                                    batch.sample_starts)
    allowed = (~layout.attention_mask()).sum().item()  # the dense reference mask's visible pairs
    got = attention_pairs(small_model_config(mechanism="insertion"), batch, IMAGE_SLOTS)
    assert got == {"self_attention": 4 * allowed, "fusion": 0}


def test_gemm_count_is_the_torch_counter_on_the_step():
    from benchmarks.flops import count_gemm_flops

    a, w = torch.randn(8, 16), torch.randn(32, 16, requires_grad=True)
    assert count_gemm_flops(lambda: (a @ w.t()).sum().backward()) == 2 * 8 * 16 * 32 * 2  # fwd + wgrad

"""Image tokens through the K/V rows of CASA's fused QKV only.

The K/V-only path must give the fused path's outputs and every gradient (own and shared
projections, frozen shared projections), and save exactly the image-query GEMM FLOPs. Under
TP=2 + SP it is checked against the fused one-process reference in tests/model/test_vlm_parallel.py.
"""

from __future__ import annotations

import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, perturbed_full_state, random_batch, small_model_config

TOL = dict(rtol=1e-5, atol=1e-6)
VARIANTS = {"own": {}, "shared": {"share_projections": True},
            "shared_frozen_lm": {"share_projections": True}, "cross_attention": {"mechanism": "cross_attention"}}


def test_kv_rows_pick_each_groups_key_and_value_rows():
    from casa_megatron.model.kv_projection import kv_rows

    # 2 groups, 3 query heads per group, head_dim 2: per group rows q q q q q q k k v v
    assert kv_rows(2, 3, 2, "cpu").tolist() == [6, 7, 8, 9, 16, 17, 18, 19]


def _compare(rank, world):
    from torch.utils.flop_counter import FlopCounterMode

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state

    initialize_parallel(1, 1, seed=0)
    batch = random_batch(5)
    report = {}
    for name, fusion in VARIANTS.items():
        runs = {}
        for kv_only in (False, True):
            config = small_model_config(**fusion, image_kv_only=kv_only)
            config.freeze_lm = name == "shared_frozen_lm"
            model = build_vlm(config, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
            if not runs:
                full = perturbed_full_state(model)
            load_full_state(model, full, 0, 1)
            pixels = batch.pixel_patches.clone().requires_grad_()
            with FlopCounterMode(display=False) as flops:
                loss = (model(batch.__class__(**{**batch.__dict__, "pixel_patches": pixels}))
                        * batch.loss_mask).sum()
                loss.backward()
            runs[kv_only] = (loss.detach(), pixels.grad, {n: p.grad for n, p in model.named_parameters()
                                                          if p.grad is not None}, flops.get_total_flops())
        (l0, px0, g0, f0), (l1, px1, g1, f1) = runs[False], runs[True]
        torch.testing.assert_close(l1, l0, **TOL)
        torch.testing.assert_close(px1, px0, **TOL)
        assert g0.keys() == g1.keys() and g0
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], **TOL, msg=lambda m: f"{name} {n}: {m}")
        report[name] = {"flops_fused": f0, "flops_kv_only": f1, "grads": sorted(g0),
                        "pixel_grad_norm": px0.norm().item()}
    return report


def test_kv_only_equals_fused_projection_and_saves_the_image_query_gemm():
    """Same loss, pixel gradient (through the ViT) and parameter gradients; FLOPs lower by
    exactly the image-query GEMM: 2 * slots * h * q_size per layer in forward, twice that in
    backward (input and weight gradient; input gradient only when the weight is frozen)."""
    report, = run_distributed(_compare, world_size=1)
    cfg = small_model_config()
    h, q_size = cfg.lm.hidden_size, cfg.lm.num_attention_heads * cfg.lm.head_dim
    slots, layers = IMAGE_SLOTS * 2, cfg.lm.num_layers  # image_seq_length * batch, CASA in every layer
    gemm = 2 * slots * h * q_size
    assert report["own"]["flops_fused"] - report["own"]["flops_kv_only"] == layers * 3 * gemm
    assert report["shared"]["flops_fused"] - report["shared"]["flops_kv_only"] == layers * 3 * gemm
    assert report["shared_frozen_lm"]["flops_fused"] - report["shared_frozen_lm"]["flops_kv_only"] == layers * 2 * gemm
    assert report["cross_attention"]["flops_fused"] - report["cross_attention"]["flops_kv_only"] == layers * 3 * gemm
    assert any(".self_attention.linear_qkv.weight" in n for n in report["shared"]["grads"])
    assert not any(n.startswith("decoder.") and ".self_attention." in n
               for n in report["shared_frozen_lm"]["grads"])  # frozen LM: no grads
    assert report["shared_frozen_lm"]["pixel_grad_norm"] > 0  # but images still get theirs

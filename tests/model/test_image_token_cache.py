"""``reused_image_tokens``: under it, a forward without autograd whose encoder input equals the
previous forward's takes that forward's projected image tokens instead of running the encoder
again (greedy generation by recomputation). The logits are bit for bit those of a forward of its
own, for CASA and insertion, float32 and bf16; a forward with other pixels, or with autograd on,
runs the encoder."""

from __future__ import annotations

import dataclasses

import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, QWEN_VISION, random_batch, small_model_config


def _reuse(rank, world):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.image_token_cache import reused_image_tokens
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    report = {}
    for name, vision, fusion, dtype in (("casa_qwen_fp32", QWEN_VISION, {}, torch.float32),
                                        ("casa_qwen_bf16", QWEN_VISION, {}, torch.bfloat16),
                                        ("insertion_fp32", None, {"mechanism": "insertion"}, torch.float32),
                                        ("insertion_bf16", None, {"mechanism": "insertion"}, torch.bfloat16)):
        temporal = 2 if vision else 1
        model = build_vlm(small_model_config(vision, **fusion), ParallelConfig(), image_seq_length=IMAGE_SLOTS,
                          params_dtype=dtype).eval()
        first = random_batch(1, with_labels=False, temporal=temporal)
        # the next generation step: other text (a token more), the same images
        text = dataclasses.replace(first, input_ids=torch.roll(first.input_ids, 1, dims=1))
        other = dataclasses.replace(first, pixel_patches=random_batch(2, temporal=temporal).pixel_patches)
        calls = []
        model.projector.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            alone = [model(b) for b in (first, text, other)]
            runs_alone = len(calls)
            with reused_image_tokens([model]) as cache:
                reused = [model(b) for b in (first, text, other)]
        same = [torch.equal(a, r) for a, r in zip(alone, reused)]
        with reused_image_tokens([model]) as cache_grad:  # training: nothing reused, gradients reach the encoder
            model(first).float().sum().backward()
            model(first).float().sum().backward()
        grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
        report[name] = dict(same=same, differs=not torch.equal(alone[0], alone[2]), calls=len(calls) - runs_alone,
                            runs_alone=runs_alone, hits=cache.hits, misses=cache.misses,
                            grad_hits=cache_grad.hits, grads=grads, dtype=str(alone[0].dtype),
                            detached=getattr(model, "image_token_cache", "gone") is None)
    return report


def test_reused_image_tokens_give_the_logits_of_recomputation():
    report = run_distributed(_reuse, world_size=1)[0]
    assert set(report) == {"casa_qwen_fp32", "casa_qwen_bf16", "insertion_fp32", "insertion_bf16"}
    for name, r in report.items():
        assert r["same"] == [True, True, True], (name, r)
        assert r["differs"], name  # other pixels give other logits: the comparison could fail
        assert r["runs_alone"] == 3 and r["hits"] == 1 and r["misses"] == 2, (name, r)
        # two forwards with autograd (4 projector calls in all with the 3 no-grad ones minus the hit)
        assert r["calls"] == 2 + 2 and r["grad_hits"] == 0 and r["grads"], (name, r)
        assert r["detached"], name
    assert report["casa_qwen_bf16"]["dtype"] == "torch.bfloat16"

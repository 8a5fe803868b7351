"""The Qwen2.5-VL encoder (+ projector = HF merger) equals transformers' vision tower.

Forward (image features) and every parameter gradient, fp32, at TP=1 and TP=2, for three
images of different sizes and a 6-frame video in one micro-batch. The MLP width is odd (45),
so TP=2 runs on the zero-padded width 48: the padding must change nothing and get zero grads.
"""

from __future__ import annotations

import torch
from support.dist import run_distributed
from support.qwen_vision import (GRID_THW, VisionStack, hf_to_megatron, hf_visual_state, hf_vision_model,
                                 model_config_for, random_pixels)

TOL = dict(rtol=1e-5, atol=1e-5)  # the bound for the features
GRAD_TOL = dict(rtol=1e-4, atol=5e-5)  # gradients sum ~600 patches' float32 terms


def _hf_reference():
    hf = hf_vision_model()
    pixels = random_pixels(GRID_THW, hf.config.in_channels * 2 * 14 * 14).requires_grad_(True)
    out = hf(pixels, grid_thw=GRID_THW).pooler_output  # [n/4, 48]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * probe).sum().backward()
    grads = {f"visual.{n}": p.grad.clone() for n, p in hf.named_parameters()}
    return hf, pixels.detach(), out.detach(), probe, grads, pixels.grad.clone()


def _worker(rank, world):
    from megatron.core import parallel_state

    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    hf, pixels, ref_out, probe, ref_grads, ref_pixel_grad = _hf_reference()
    cfg = model_config_for(hf.config)
    initialize_parallel(world, 1, seed=0)
    stack = VisionStack(cfg, tp=world)
    names = [n for n, _ in stack.named_parameters()]
    fresh = gather_full(stack, {n: p.detach() for n, p in stack.named_parameters()},
                        parallel_state.get_tensor_model_parallel_group())  # as built: from scratch
    full = hf_to_megatron(names, cfg, hf_visual_state(hf))
    assert sorted(full) == sorted(names)
    load_full_state(stack, full, parallel_state.get_tensor_model_parallel_rank(), world)

    x = pixels.clone().requires_grad_(True)
    out = stack(x, GRID_THW)
    torch.testing.assert_close(out, ref_out, **TOL)
    (out * probe).sum().backward()
    torch.testing.assert_close(x.grad, ref_pixel_grad, **GRAD_TOL)
    grads = gather_full(stack, {n: p.grad for n, p in stack.named_parameters()},
                        parallel_state.get_tensor_model_parallel_group())
    expected = hf_to_megatron(names, cfg, ref_grads)  # the transforms are linear: grads map alike
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    fc1 = grads["vision.blocks.0.mlp.linear_fc1.weight"]
    padded, real = cfg.vision.padded_ffn_hidden_size, cfg.vision.ffn_hidden_size
    return {"max_err": (out - ref_out).abs().max().item(),
            "max_grad_err": max((grads[n] - expected[n]).abs().max().item() for n in grads), "padded": padded, "real": real,
            "pad_grad": fc1[real:padded].abs().sum().item(), "tokens": out.shape[0],
            "fresh_padding": _padding(fresh, real, padded)}


def _padding(state, real: int, padded: int) -> dict:
    """Per MLP tensor, the sum of |entries| of the padded units (fc1: gate and up rows, biases;
    fc2: columns) and of the real ones."""
    out = {}
    for name, t in state.items():
        if ".mlp.linear_fc1." in name:
            pad = torch.cat([half[real:] for half in t.view(2, padded, *t.shape[1:])])
            out[name] = (pad.abs().sum().item(), t.abs().sum().item())
        elif ".mlp.linear_fc2.weight" in name:
            out[name] = (t[:, real:].abs().sum().item(), t.abs().sum().item())
    return out


def test_qwen_encoder_equals_transformers_tp1():
    report = run_distributed(_worker, world_size=1)[0]
    assert report["tokens"] == int(GRID_THW.prod(1).sum()) // 4
    assert report["pad_grad"] == 0.0


def test_qwen_encoder_equals_transformers_tp2_with_padded_mlp():
    reports = run_distributed(_worker, world_size=2)
    assert all(r["padded"] == 48 and r["real"] == 45 for r in reports)
    assert all(r["pad_grad"] == 0.0 for r in reports)
    # built from scratch, the padded units are already the exact no-ops an import makes them
    # (zero gate / up rows, biases and down columns; units 45..47, on the second TP rank)
    for report in reports:
        padding = report["fresh_padding"]
        assert len(padding) == 4 * 3, sorted(padding)  # 4 blocks: fc1 weight, fc1 bias, fc2 weight
        assert all(pad == 0.0 for pad, _ in padding.values()), padding
        assert all(whole > 0.0 for name, (_, whole) in padding.items() if name.endswith("weight")), padding

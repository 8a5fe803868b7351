"""Whole-VLM behaviour on one process: freezing, and bad inputs caught with clear errors."""

from __future__ import annotations

import dataclasses

import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, random_batch, small_model_config


def _build(model_cfg):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    return build_vlm(model_cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)


def _freezing(rank, world):
    cfg = small_model_config()
    cfg = dataclasses.replace(cfg, freeze_lm=True,
                              vision=dataclasses.replace(cfg.vision, trainable_blocks=1))
    model = _build(cfg)
    batch = random_batch(2)
    (model(batch) * batch.loss_mask).sum().backward()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    new = sorted(n for n, p in model.named_parameters() if p.casa_new)
    return trainable, with_grad, new


def test_freezing_lm_and_all_but_last_vit_block():
    trainable, with_grad, new = run_distributed(_freezing, world_size=1)[0]
    assert trainable == with_grad
    assert not any(n.startswith(("embedding.", "output_layer.")) for n in trainable)
    assert not any(".self_attention." in n or ".mlp." in n for n in trainable if n.startswith("decoder"))
    assert any(".casa_attention." in n for n in trainable)
    assert not any(n.startswith("vision.blocks.0.") for n in trainable)
    assert any(n.startswith("vision.blocks.1.") for n in trainable)
    assert all(".casa_" in n or n.startswith("projector.") for n in new)


def _bad_inputs(rank, world):
    model = _build(small_model_config())
    errors = {}
    cases = {
        "patch_count": lambda b: dataclasses.replace(b, pixel_patches=b.pixel_patches[:-3]),
        "overrun": lambda b: dataclasses.replace(b, image_positions=torch.tensor([0, 0, 9, 5, 16])),
        "order": lambda b: dataclasses.replace(b, image_positions=torch.tensor([9, 0, 0, 5, 11])),
        "not_window_start": lambda b: dataclasses.replace(
            b, window_starts=torch.zeros_like(b.sample_starts)),
        "too_many_image_tokens": lambda b: dataclasses.replace(
            b, image_grid_hw=b.image_grid_hw * 2,
            pixel_patches=torch.randn(int((b.image_grid_hw * 2).prod(1).sum()), b.pixel_patches.shape[1])),
    }
    for name, corrupt in cases.items():
        try:
            model(corrupt(random_batch(0)))
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


def test_bad_inputs_raise_clear_errors():
    errors = run_distributed(_bad_inputs, world_size=1)[0]
    assert "describes" in errors["patch_count"] and "patches" in errors["patch_count"]
    assert errors["overrun"] and "overrun" in errors["overrun"]
    assert errors["order"] and "order" in errors["order"]
    assert errors["not_window_start"] and "does not start its window" in errors["not_window_start"]
    assert errors["too_many_image_tokens"] and "slots" in errors["too_many_image_tokens"]

"""Both encoders inside the VLM: per-image attention (no leakage between images, equal to
encoding each image alone), a micro-batch without any image, freezing the last k blocks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, QWEN_VISION, random_batch, small_model_config, without_images

def _config(encoder: str, **fusion):
    return small_model_config(QWEN_VISION if encoder == "qwen2_5_vl" else None, **fusion)


def _build(cfg, dtype=torch.float32):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    return build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS, params_dtype=dtype)


def _batch_for(cfg, seed: int):
    return random_batch(seed, temporal=cfg.vision.temporal_patch_size)


def _alone_vs_together(rank, world, encoder):
    cfg = _config(encoder)
    model = _build(cfg)
    batch = _batch_for(cfg, 0)
    grid = batch.image_grid_thw
    with torch.no_grad():
        together = model.vision(batch.pixel_patches, grid)
        alone, start = [], 0
        for g in grid:
            n = int(g.prod())
            alone.append(model.vision(batch.pixel_patches[start:start + n], g[None]))
            start += n
    return (together - torch.cat(alone)).abs().max().item(), together.abs().mean().item()


@pytest.mark.parametrize("encoder", ["tiny_vit", "qwen2_5_vl"])
def test_images_attend_only_to_themselves(encoder):
    err, scale = run_distributed(_alone_vs_together, world_size=1, encoder=encoder)[0]
    assert err < 1e-5 * max(1.0, scale)


def _imageless(rank, world):
    results = {}
    for encoder in ("tiny_vit", "qwen2_5_vl"):
        for mechanism in ("casa", "cross_attention", "insertion"):
            cfg = _config(encoder, mechanism=mechanism)
            model = _build(cfg, torch.bfloat16)
            batch = without_images(_batch_for(cfg, 4))
            loss = (model(batch).float() * batch.loss_mask).sum() / batch.loss_mask.sum()
            loss.backward()
            without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            block_grad = max(float(p.grad.abs().max()) for p in model.vision.blocks.parameters())
            with torch.no_grad():  # the blank image the encoder runs must not reach the loss
                for p in model.vision.parameters():
                    p.add_(torch.randn_like(p))
                moved = (model(batch).float() * batch.loss_mask).sum() / batch.loss_mask.sum()
            results[f"{encoder}/{mechanism}"] = (loss.item(), moved.item(), without_grad, block_grad)
    return results


def test_micro_batch_without_images_bf16():
    """A micro-batch without images trains in bf16, and reaches every trainable parameter (the
    encoder runs one blank image whose result joins times zero: data-parallel overlap needs the
    same parameters in every micro-batch, tests/training/test_overlap.py): every gradient exists,
    the encoder blocks' are exactly zero, and the loss does not change when the encoder's weights do."""
    results = run_distributed(_imageless, world_size=1)[0]
    assert len(results) == 6
    for name, (loss, moved, without_grad, block_grad) in results.items():
        assert torch.isfinite(torch.tensor(loss)), name
        assert moved == loss, name
        assert without_grad == [] and block_grad == 0.0, (name, without_grad, block_grad)


def _freeze_last_block(rank, world):
    cfg = _config("qwen2_5_vl")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, trainable_blocks=1))
    model = _build(cfg)
    batch = _batch_for(cfg, 2)
    (model(batch) * batch.loss_mask).sum().backward()
    return sorted(n for n, p in model.named_parameters() if n.startswith("vision.") and p.grad is not None)


def test_qwen_encoder_trains_only_its_last_blocks():
    with_grad = run_distributed(_freeze_last_block, world_size=1)[0]
    assert with_grad and all(n.startswith("vision.blocks.1.") for n in with_grad)


def _largest_tensor(rank, world, encoder):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    cfg = _config(encoder)
    model = _build(cfg)
    grid = torch.tensor([[1, 8, 8]] * 16)  # 16 images of 64 patches: 1024 patches
    pixels = torch.randn(1024, cfg.vision.patch_dim)
    with torch.no_grad(), Largest():
        model.vision(pixels, grid)
    return Largest.numel


@pytest.mark.parametrize("encoder", ["tiny_vit", "qwen2_5_vl"])
def test_no_dense_mask_over_the_micro_batch(encoder):
    """The largest intermediate grows with the images, not with (all patches)^2."""
    largest = run_distributed(_largest_tensor, world_size=1, encoder=encoder)[0]
    assert largest < 1024 * 1024 // 8, largest

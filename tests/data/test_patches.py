"""Pixel patches in Qwen2.5-VL's layout equal transformers' processors; frames of a clip that
share a window are grouped in pairs by the packer; our smart resize picks transformers' sizes."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from support.dist import run_distributed

from casa_megatron.data.image_processing import CLIP_MEAN, CLIP_STD, normalize_pixels, smart_resize
from casa_megatron.data.packing import Packer
from casa_megatron.data.patches import frames_to_patches, image_to_patches
from casa_megatron.data.records import ImageItem, TokenizedSample


def _uint8(shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(56, 84), (112, 28), (84, 140)])
def test_image_patches_equal_qwen2vl_image_processor(size):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _uint8((3, *size), seed=size[0] * size[1])
    hf = Qwen2VLImageProcessorPil(do_resize=False, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    out = hf(images=[Image.fromarray(image.permute(1, 2, 0).numpy())], return_tensors="pt")
    ours, (h, w) = image_to_patches(normalize_pixels(image, CLIP_MEAN, CLIP_STD), temporal=2)
    assert out["image_grid_thw"].tolist() == [[1, h, w]]
    assert ours.shape == (h * w, 3 * 2 * 14 * 14)
    torch.testing.assert_close(ours, out["pixel_values"].float(), rtol=0, atol=2e-6)


def _video_patchify_vs_transformers(rank, world, n_frames):
    """transformers' video processor needs torchvision only for resizing: its ``patchify`` is pure
    torch, so a stub module lets us call the real method (in this forked child only)."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = normalize_pixels(_uint8((n_frames, 3, 56, 84), seed=n_frames), CLIP_MEAN, CLIP_STD)
    ref, t, h, w = Qwen2VLVideoProcessor.patchify(None, frames[None], patch_size=14, merge_size=2,
                                                  temporal_patch_size=2)
    ours, grid = frames_to_patches(frames, temporal=2)
    assert grid == (t, h, w)
    return (ours - ref[0]).abs().max().item()


@pytest.mark.parametrize("n_frames", [4, 5])
def test_video_patches_equal_qwen2vl_video_processor(n_frames):
    assert run_distributed(_video_patchify_vs_transformers, world_size=1, n_frames=n_frames) == [0.0]


def test_odd_frame_count_repeats_the_last_frame():
    frames = _uint8((3, 3, 28, 28), seed=1).float()
    patches, (t, h, w) = frames_to_patches(frames, temporal=2)
    padded, _ = frames_to_patches(torch.cat([frames, frames[-1:]]), temporal=2)
    assert (t, h, w) == (2, 2, 2) and torch.equal(patches, padded)


def _video_sample(n_frames: int, same_window: bool) -> TokenizedSample:
    frames = _uint8((n_frames, 3, 28, 56), seed=7)
    positions = [0] * n_frames if same_window else list(range(n_frames))
    return TokenizedSample(key="clip", input_ids=list(range(1, 9)), labels=[0] * 8, loss_mask=[0.0] * 8,
                           window_starts=sorted(set(positions)), kind="video",
                           images=[ImageItem(p, f) for p, f in zip(positions, frames)])


def test_packer_groups_frames_sharing_a_window_in_pairs():
    packer = Packer(1, 8, 64, pad_id=0, temporal_patch_size=2, fps=4.0)
    clip, _ = packer.collate([[_video_sample(3, same_window=True)]])
    assert clip.image_grid_hw.tolist() == [[2, 4]] and clip.image_grid_t.tolist() == [2]
    assert clip.image_second_per_grid.tolist() == [0.5]  # 2 frames at 4 fps
    frames = normalize_pixels(torch.stack([im.pixels for im in _video_sample(3, True).images]), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(clip.pixel_patches, frames_to_patches(frames, temporal=2)[0])
    per_frame, _ = packer.collate([[_video_sample(3, same_window=False)]])  # a window per frame
    assert per_frame.image_grid_t.tolist() == [1, 1, 1] and per_frame.image_second_per_grid.tolist() == [0.0] * 3
    assert per_frame.pixel_patches.shape == (3 * 8, 3 * 2 * 14 * 14)
    empty, _ = packer.collate([[]])
    assert empty.pixel_patches.shape == (0, 3 * 2 * 14 * 14) and empty.image_grid_t.numel() == 0


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for height, width in rng.integers(20, 2000, size=(200, 2)).tolist():
        if max(height, width) / min(height, width) > 20:
            continue  # thin images: ours never returns a side below 28 px while over budget (documented)
        ours = smart_resize(height, width, max_pixels=448 * 448, min_pixels=56 * 56)
        assert ours == hf_smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=448 * 448)

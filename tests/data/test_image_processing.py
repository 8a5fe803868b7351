"""Smart resize (budgets, aspect, agreement with Qwen2-VL's reference) and image decoding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from data.helpers import png_bytes, solid_png

from casa_megatron.data.image_processing import decode_image, process_image, resize_uint8, smart_resize
from casa_megatron.data.records import SampleError


@pytest.mark.parametrize("height,width,budget", [(224, 224, 448 * 448), (1000, 500, 448 * 448),
                                                 (97, 203, 224 * 224), (3000, 40, 448 * 448),
                                                 (20, 30, 448 * 448), (4000, 3000, 28 * 28 * 16)])
def test_smart_resize_respects_unit_budget_and_aspect(height, width, budget):
    h, w = smart_resize(height, width, budget, min_pixels=56 * 56)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    assert h * w <= budget
    if min(height, width) >= 56:
        assert abs(np.log((h / w) / (height / width))) < 0.45  # aspect kept up to 28 px rounding


def test_smart_resize_known_values():
    assert smart_resize(224, 224, 448 * 448) == (224, 224)  # already aligned: untouched
    assert smart_resize(1000, 500, 448 * 448) == (616, 308)  # scaled by sqrt(area ratio), floored
    assert smart_resize(20, 30, 448 * 448, min_pixels=56 * 56) == (56, 84)  # grown to min_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000, 448 * 448)


def test_smart_resize_matches_qwen2_vl_reference():
    """Same result as transformers' Qwen2-VL smart_resize wherever the reference itself keeps the
    budget (for sub-28 px sides it can exceed max_pixels; we never do)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    rng = random.Random(0)
    compared = 0
    for _ in range(3000):
        height, width = rng.randint(28, 3000), rng.randint(28, 3000)
        max_pixels = rng.choice([50176, 200704, 1003520])
        expected = reference(height, width, 28, 3136, max_pixels)
        if expected[0] * expected[1] > max_pixels:
            continue
        assert smart_resize(height, width, max_pixels, 3136) == tuple(expected), (height, width, max_pixels)
        compared += 1
    assert compared > 2500


def test_process_image_keeps_colour_and_aligns_size():
    pixels = process_image(solid_png(60, 90, (200, 40, 40)), 448 * 448, 56 * 56)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 56, 84)
    assert torch.equal(pixels[:, 10, 10], torch.tensor([200, 40, 40], dtype=torch.uint8))


def test_decode_image_rgb_order_and_layout():
    array = np.zeros((30, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    pixels = decode_image(png_bytes(array))
    assert tuple(pixels.shape) == (3, 30, 40)
    assert pixels[0, 0, 0] == 255 and pixels[2, 0, 39] == 255 and pixels[2, 0, 0] == 0


def test_resize_uint8_batched_matches_single():
    frames = torch.randint(0, 256, (3, 3, 50, 70), dtype=torch.uint8)
    batched = resize_uint8(frames, (28, 56))
    assert torch.equal(batched[1], resize_uint8(frames[1], (28, 56)))


@pytest.mark.parametrize("data,reason", [(b"", "empty_file"), (b"not an image at all", "corrupt_image")])
def test_bad_image_bytes_raise_sample_error(data, reason):
    with pytest.raises(SampleError) as info:
        process_image(data, 448 * 448, 56 * 56, key="k1")
    assert info.value.reason == reason and "k1" in str(info.value)


def test_truncated_png_is_corrupt():
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    with pytest.raises(SampleError) as info:
        decode_image(data[: len(data) // 2], key="half")
    assert info.value.reason == "corrupt_image"

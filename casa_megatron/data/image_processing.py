"""Images to model-ready pixels: decode, "smart resize" to the patch grid under a pixel budget.

The vision encoder sees 14 px patches merged 2x2, so both sides must be multiples of 28. Like
Qwen2.5-VL we keep the native aspect ratio and only round the sides to that unit, scaling the
whole image down (or up) when its area leaves ``[min_pixels, max_pixels]``: the number of image
tokens then grows with the content's resolution, up to the budget.
"""

from __future__ import annotations

import io
import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from casa_megatron.data.records import SampleError

UNIT = 28  # patch 14 x merge 2
MAX_ASPECT = 200.0
# Per-channel pixel normalisation of the OpenAI CLIP / Qwen2-VL processors: the pretrained
# encoders expect it, and a from-scratch one learns faster from zero-centred, unit-scale pixels
# than from [0, 1] values whose grey background swamps the colour differences.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(pixels: Tensor, mean, std) -> Tensor:
    """uint8 [..., C, H, W] -> float32 ``(pixels / 255 - mean) / std`` per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int = UNIT * UNIT,
                 factor: int = UNIT) -> Tuple[int, int]:
    """(height, width) -> (h, w): multiples of ``factor``, aspect kept, ``h*w <= max_pixels``.

    Rounds each side to the nearest multiple; if the area leaves the budget, rescales by the
    square root of the area ratio and rounds towards the inside of the budget (floor when
    shrinking, ceil when growing). Never returns a side below ``factor``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} px has no area")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio of a {height}x{width} px image exceeds {MAX_ASPECT:.0f}:1")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} unit")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
        while h * w > max_pixels:  # the max(factor, .) clamp on a thin image can overshoot
            if h >= w:
                h -= factor
            else:
                w -= factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
        if h * w > max_pixels:  # min and max budgets conflict: the max wins
            return smart_resize(height, width, max_pixels, 1, factor)
    return h, w


def resize_uint8(pixels: Tensor, size: Tuple[int, int]) -> Tensor:
    """[..., 3, H, W] uint8 -> [..., 3, h, w] uint8, bilinear with antialiasing (area-like when
    shrinking). One function for images and CPU-decoded frames, so both look alike."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels.contiguous()
    lead = pixels.shape[:-3]
    x = pixels.reshape(-1, *pixels.shape[-3:]).float()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(*lead, 3, *size)


def decode_image(data: bytes, key: str = "?") -> Tensor:
    """Encoded PNG/JPEG/... bytes -> [3, H, W] uint8 RGB; SampleError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SampleError("empty_file", f"{key}: image file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # forces the full decode: truncated files fail here, not later
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError("corrupt_image", f"{key}: cannot decode image ({e})") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # [3, H, W]


def process_image(data: bytes, max_pixels: int, min_pixels: int, key: str = "?") -> Tensor:
    """Encoded image -> [3, h, w] uint8 with h, w multiples of 28 under the pixel budget."""
    pixels = decode_image(data, key)
    try:
        size = smart_resize(pixels.shape[1], pixels.shape[2], max_pixels, min_pixels)
    except ValueError as e:
        raise SampleError("bad_image_size", f"{key}: {e}") from e
    return resize_uint8(pixels, size)

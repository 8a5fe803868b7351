"""Images and clips -> pixel patches in the vision encoder's convention (``model/vision/interface.py``).

Qwen2.5-VL's layout (its ``Qwen2VLImageProcessor`` / video processor): a clip of ``n`` frames
becomes ``ceil(n / T)`` temporal patches of ``T`` consecutive frames (``T`` =
``temporal_patch_size``; an odd tail repeats the last frame, a still image is its frame repeated
``T`` times); each row is one ``[C, T, p, p]`` patch, rows ordered by temporal patch, then
merge-group first (``[h/m, w/m, m, m]``) so that each ``m*m`` consecutive rows form one merged
LM token. ``T = 1`` (``tiny_vit``) gives plain ``[C, p, p]`` rows.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def frames_to_patches(frames: Tensor, patch: int = 14, merge: int = 2,
                      temporal: int = 1) -> Tuple[Tensor, Tuple[int, int, int]]:
    """frames [n, C, H, W] (H, W multiples of patch*merge) -> patches [t*h*w, C*T*p*p], (t, h, w)."""
    n, c, height, width = frames.shape
    unit = patch * merge
    if height % unit or width % unit:
        raise ValueError(f"image of {height}x{width} px is not a multiple of {unit} px "
                         f"(patch {patch} x merge {merge}); resize it first")
    if n < 1:
        raise ValueError("a clip needs at least one frame")
    if n % temporal:  # like transformers: repeat the last frame up to a whole temporal patch
        frames = torch.cat([frames, frames[-1:].expand(temporal - n % temporal, -1, -1, -1)])
    t, h, w = frames.shape[0] // temporal, height // patch, width // patch
    x = frames.reshape(t, temporal, c, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, T, p, p]
    return x.reshape(t * h * w, c * temporal * patch * patch), (t, h, w)


def image_to_patches(image: Tensor, patch: int = 14, merge: int = 2,
                     temporal: int = 1) -> Tuple[Tensor, Tuple[int, int]]:
    """image [C, H, W] -> patches [h*w, C*T*p*p] (the frame repeated T times), (h, w)."""
    patches, (_, h, w) = frames_to_patches(image[None].expand(temporal, -1, -1, -1), patch, merge, temporal)
    return patches, (h, w)

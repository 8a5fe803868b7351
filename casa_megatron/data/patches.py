"""Images -> pixel patches in the vision encoder's convention (see ``model/vision.py``)."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor


def image_to_patches(image: Tensor, patch: int = 14, merge: int = 2) -> Tuple[Tensor, Tuple[int, int]]:
    """image [C, H, W] (H, W multiples of patch*merge) -> patches [h*w, C*patch*patch], (h, w).

    Patches are ordered merge-group first ([h/m, w/m, m, m]) so that each m*m consecutive
    patches form one merged LM token.
    """
    c, height, width = image.shape
    unit = patch * merge
    if height % unit or width % unit:
        raise ValueError(f"image of {height}x{width} px is not a multiple of {unit} px "
                         f"(patch {patch} x merge {merge}); resize it first")
    h, w = height // patch, width // patch
    x = image.reshape(c, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
    return x.reshape(h * w, c * patch * patch), (h, w)

"""``CasaProcessor``: text + images -> model inputs, without torchvision.

Images follow casa_megatron's data pipeline exactly (``data/image_processing.py``,
``data/patches.py``): Qwen2.5-VL-style "smart resize" (sides multiples of 28 px, aspect kept,
area inside ``[min_pixels, max_pixels]``), bilinear antialiased resize of uint8 pixels (torch),
per-channel normalisation, then 14 px patches in merge-group-first order. ``tiny_vit`` takes
``[h*w, C*14*14]`` patches; ``qwen2_5_vl`` takes transformers' own layout (each still image
repeated to the temporal patch of 2, ``[h*w, C*2*14*14]``). The text side is the tokenizer plus
the chat template (one ``<image>`` placeholder per image), kept separate from the pixels so the
template can change without touching the image path.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200.0

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %}<answer> {% elif message['role'] == 'assistant' %}<eot> {% endif %}"
    "{% endfor %}"
)


def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int, factor: int = 28) -> Tuple[int, int]:
    """(height, width) -> multiples of ``factor``, aspect kept, area within the budget."""
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
        while h * w > max_pixels:
            if h >= w:
                h -= factor
            else:
                w -= factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
        if h * w > max_pixels:
            return smart_resize(height, width, max_pixels, 1, factor)
    return h, w


def to_uint8_chw(image) -> torch.Tensor:
    """PIL image, HWC uint8 array or CHW uint8 tensor -> [3, H, W] uint8 RGB."""
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 3 and t.shape[0] != 3 and t.shape[-1] == 3:
            t = t.permute(2, 0, 1)
    else:
        if hasattr(image, "convert"):  # PIL
            image = np.asarray(image.convert("RGB"))
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {arr.shape}")
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    return t.contiguous()


def resize_uint8(pixels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels.contiguous()
    x = F.interpolate(pixels[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def image_patches(pixels: torch.Tensor, encoder: str = "tiny_vit", mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD, patch: int = 14, merge: int = 2,
                  temporal: int = 2) -> Tuple[torch.Tensor, List[int]]:
    """[3, H, W] uint8 (already resized) -> normalised patches [n, D] and the grid [t, h, w].

    ``tiny_vit``: ``[h*w, C*p*p]`` merge-group first (casa_megatron ``data/patches.py``).
    ``qwen2_5_vl``: transformers' Qwen2-VL layout ``[h*w, C*T*p*p]``, the still frame repeated T times.
    """
    x = (pixels.float() / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    c, height, width = x.shape
    p, m = patch, merge
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image of {height}x{width} px is not a multiple of {p * m} px; resize it first")
    h, w = height // p, width // p
    if encoder == "tiny_vit":
        y = x.reshape(c, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
        return y.reshape(h * w, c * p * p), [1, h, w]
    y = x[None].expand(temporal, c, height, width)
    y = y.reshape(1, temporal, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return y.reshape(h * w, c * temporal * p * p), [1, h, w]


class CasaProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, chat_template: Optional[str] = None, encoder: str = "tiny_vit",
                 max_pixels: int = 448 * 448, min_pixels: int = 56 * 56, video_max_pixels: int = 224 * 224,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                 image_token: str = "<image>", **kwargs):
        self.encoder = encoder
        self.max_pixels, self.min_pixels, self.video_max_pixels = max_pixels, min_pixels, video_max_pixels
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_token = image_token
        super().__init__(tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    # --- pixels ---------------------------------------------------------------------------
    def resize(self, image, max_pixels: Optional[int] = None) -> torch.Tensor:
        """Any image -> [3, h, w] uint8, h and w multiples of patch * merge."""
        pixels = to_uint8_chw(image)
        unit = self.patch_size * self.merge_size
        size = smart_resize(pixels.shape[1], pixels.shape[2], max_pixels or self.max_pixels, self.min_pixels, unit)
        return resize_uint8(pixels, size)

    def patches(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        return image_patches(pixels, self.encoder, self.image_mean, self.image_std, self.patch_size,
                             self.merge_size, self.temporal_patch_size)

    def process_images(self, images: Sequence, max_pixels: Optional[int] = None):
        chunks, grids = [], []
        for image in images:
            patches, grid = self.patches(self.resize(image, max_pixels))
            chunks.append(patches)
            grids.append(grid)
        return torch.cat(chunks), torch.tensor(grids, dtype=torch.long)

    # --- text + images ------------------------------------------------------------------------
    def __call__(self, text: Union[str, List[str], None] = None, images: Optional[Sequence] = None,
                 max_pixels: Optional[int] = None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """``text`` with one ``<image>`` per image (images in stream order over all rows)."""
        if text is None:
            raise ValueError("CasaProcessor needs text (one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]  # left padding, as generate() wants
        ids = [[pad] * (width - len(x)) + x for x in ids]
        images = list(images or [])
        n_ph = sum(tok == self.image_token_id for row, m in zip(ids, mask) for tok, keep in zip(row, m) if keep)
        if n_ph != len(images):
            raise ValueError(f"the text has {n_ph} {self.image_token!r} placeholder(s) but {len(images)} "
                             "image(s) were given")
        data = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        data["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        if images:
            data["pixel_values"], data["image_grid_thw"] = self.process_images(images, max_pixels)
        return BatchFeature(data=data, tensor_type=None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["CasaProcessor"]

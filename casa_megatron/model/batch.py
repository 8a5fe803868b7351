"""The micro-batch a VLM consumes: packed text, images outside the text stream, and where
each image is inserted. Produced by the data pipeline (packing) or by tests directly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class VLMBatch:
    input_ids: Tensor  # [b, s] text tokens only (one placeholder token may mark an image)
    position_ids: Tensor  # [b, s] text positions (count text only; restart per packed sample)
    pixel_patches: Tensor  # [n_patches, C*T*p*p] all images of the micro-batch, in stream order
    image_grid_hw: Tensor  # [n_img, 2] patch grid of each image
    image_rows: Tensor  # [n_img] row of the batch each image belongs to
    image_positions: Tensor  # [n_img] text position the image is inserted before (window start)
    labels: Optional[Tensor] = None  # [b, s] next-token targets
    loss_mask: Optional[Tensor] = None  # [b, s] 1.0 on answer tokens
    sample_starts: Optional[Tensor] = None  # [b, s] bool: packed-sample boundaries (SA is block-causal)
    window_starts: Optional[Tensor] = None  # [b, s] bool: extra window starts (QA pairs, frames)
    # Temporal patches per image (qwen2_5_vl: a clip's frames in pairs; a still image is 1); None = all 1.
    image_grid_t: Optional[Tensor] = None  # [n_img]
    # Seconds covered by one temporal patch of a video (Qwen2.5-VL's second_per_grid_ts), for the
    # temporal multimodal-RoPE step; 0 (or None) marks a still image.
    image_second_per_grid: Optional[Tensor] = None  # [n_img] float

    def to(self, device) -> "VLMBatch":
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))
        })

    @property
    def shape(self):
        return tuple(self.input_ids.shape)

    @property
    def image_grid_thw(self) -> Tensor:
        """[n_img, 3] (temporal, height, width) patch grid of each image (Qwen2.5-VL's grid_thw)."""
        hw = self.image_grid_hw.long().reshape(-1, 2)
        if self.image_grid_t is None:
            return torch.cat([torch.ones_like(hw[:, :1]), hw], dim=1)
        t = self.image_grid_t.long().reshape(-1, 1)
        if t.shape[0] != hw.shape[0]:
            raise ValueError(f"image_grid_t has {t.shape[0]} entries but image_grid_hw {hw.shape[0]} (one per image)")
        return torch.cat([t, hw], dim=1)


def block_causal_mask(sample_starts: Optional[Tensor], batch: int, seq: int, device) -> Tensor:
    """[b, 1, s, s] bool, True = masked: causal within each packed sample, nothing across."""
    if sample_starts is None:
        seg = torch.zeros(batch, seq, dtype=torch.long, device=device)
    else:
        seg = torch.cumsum(sample_starts.long(), dim=1)
    pos = torch.arange(seq, device=device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
    return (~allowed)[:, None]


def window_start_marks(batch: VLMBatch) -> Optional[Tensor]:
    """Authoritative window starts: explicit ones plus sample boundaries (images must sit on them).

    Without explicit window starts, windows open at sample boundaries and at every image.
    """
    b, s = batch.shape
    if batch.window_starts is None and batch.sample_starts is None:
        return None
    starts = torch.zeros(b, s, dtype=torch.bool, device=batch.input_ids.device)
    if batch.sample_starts is not None:
        starts |= batch.sample_starts.bool()
    if batch.window_starts is not None:
        starts |= batch.window_starts.bool()
    else:
        in_range = (batch.image_positions >= 0) & (batch.image_positions < s)
        starts[batch.image_rows[in_range], batch.image_positions[in_range]] = True
    return starts

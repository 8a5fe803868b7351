"""Where every patch sits, and the attention segments and 2D rotary phases derived from it.

Pure functions of the grids (no weights), computed once per micro-batch and shared by every
block. Patches are in the interface's order (``interface.py``): image by image, frame by frame,
merge-group first inside a frame. All segments are frames or windows *inside* a frame, so
patches of different images (or frames) never attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from casa_megatron.model.packed_attention import segment_params


def _check_grid(grid_thw: Tensor, merge: int) -> None:
    for idx, (t, h, w) in enumerate(grid_thw.tolist()):
        if t < 1 or h % merge or w % merge or h < merge or w < merge:
            raise ValueError(f"image {idx}: patch grid {t}x{h}x{w} (t, h, w) is not a positive multiple of "
                             f"the {merge}x{merge} merge")


def patch_coords(grid_thw: Tensor, merge: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Row, column and frame index (counted over the micro-batch) of every patch: [n] each.

    An empty grid (a micro-batch without images) gives empty tensors.
    """
    grid_thw = grid_thw.long().cpu().reshape(-1, 3)
    _check_grid(grid_thw, merge)
    rows, cols, frames = [], [], []
    frame = 0
    for t, h, w in grid_thw.tolist():
        gi, gj, di, dj = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge),
                                        torch.arange(merge), torch.arange(merge), indexing="ij")
        rows.append((gi * merge + di).flatten().repeat(t))
        cols.append((gj * merge + dj).flatten().repeat(t))
        frames.append(torch.arange(frame, frame + t).repeat_interleave(h * w))
        frame += t
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(rows), torch.cat(cols), torch.cat(frames)


def frame_segments(grid_thw: Tensor) -> Tensor:
    """cu_seqlens [n_frames + 1] int32: one attention segment per frame (Qwen2.5-VL's "full"
    attention is per temporal patch, not per clip)."""
    grid_thw = grid_thw.long().cpu().reshape(-1, 3)
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # [n_frames]
    return F.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


def window_partition(grid_thw: Tensor, merge: int, window_units: int) -> Tuple[Tensor, Tensor]:
    """Qwen2.5-VL window attention: square windows of ``window_units`` merged tokens per side.

    Returns ``unit_order`` [n_units] (merge groups sorted by frame, window row, window column,
    then row-major inside the window; the windows at the right/bottom edge are smaller) and
    ``cu_seqlens`` [n_windows + 1] int32 in patches over that order.
    """
    grid_thw = grid_thw.long().cpu().reshape(-1, 3)
    keys, key_base = [], 0
    for t, h, w in grid_thw.tolist():
        hm, wm = h // merge, w // merge
        n_wy, n_wx = -(-hm // window_units), -(-wm // window_units)
        y, x = torch.meshgrid(torch.arange(hm), torch.arange(wm), indexing="ij")
        in_frame = ((y // window_units) * n_wx + (x // window_units)).flatten()  # [hm*wm]
        per_frame = n_wy * n_wx
        keys.append((in_frame[None] + key_base + per_frame * torch.arange(t)[:, None]).flatten())
        key_base += t * per_frame
    if not keys:
        return torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32)
    key = torch.cat(keys)  # [n_units] window id of every merge group, in input order
    unit_order = torch.sort(key, stable=True).indices
    sizes = torch.unique_consecutive(key[unit_order], return_counts=True)[1] * merge * merge
    return unit_order, F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)


def rotary_2d(rows: Tensor, cols: Tensor, head_dim: int, theta: float) -> Tensor:
    """2D RoPE phases in megatron's layout [n, 1, 1, head_dim]: the first quarter of the
    frequencies rotate by the patch row, the second by the column, repeated for the two halves
    that ``rotate_half`` pairs (Qwen2.5-VL's axial vision RoPE)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))  # [hd/4]
    freqs = torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [n, 1, 1, hd]


@dataclass
class Segments:
    """Non-causal attention segments handed to every block (megatron's PackedSeqParams slot)."""

    cu_seqlens: Tensor  # [n_segments + 1] int32

    def packed(self, device) -> PackedSeqParams:
        """The packed core attention's ``sbhd_packed`` format (``model/packed_attention.py``):
        megatron applies our per-patch RoPE on the [n, 1, heads, d] layout as in ``sbhd``
        (``thd`` would restart positions per segment); the core attention reads the segments
        from cu_seqlens."""
        return segment_params(self.cu_seqlens, device)

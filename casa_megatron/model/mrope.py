"""Multimodal RoPE (Qwen2.5-VL's M-RoPE): image tokens get (temporal, height, width) positions.

The rotary frequencies of a head are split into three sections (``model.lm.mrope_section``,
``[16, 24, 24]`` of Qwen2.5-VL's 64 frequency pairs): section 0 rotates by the temporal
position, 1 by the row, 2 by the column. A text token has the same position on all three, so
it gets exactly the 1-D RoPE of the backbone: mrope changes nothing for text, whatever the LM.

Positions come from the packed batch's *structure* (where images are inserted, their grids),
never from searching token ids:

- :func:`casa_image_positions` (CASA / cross-attention, scheme ``mrope``): image keys sit at
  ``window start + (t, h, w)`` (in merged tokens; the images of one window follow each other in
  time), so the query-key phase depends on the distance from the window start, as with the
  ``insertion`` scheme, *and* on the frame and the patch's place in it.
- :func:`insertion_positions` (token insertion, scheme ``mrope``): transformers'
  ``Qwen2_5_VLModel.get_rope_index`` on the combined stream, restarted per packed sample.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def temporal_steps(grid_thw: Tensor, seconds_per_grid: Optional[Tensor], tokens_per_second: float) -> Tensor:
    """[n_img] float: temporal position step between two temporal patches of each image.

    Videos (``seconds_per_grid > 0``) step by ``tokens_per_second * seconds_per_grid`` as in
    transformers; still images (and ``None``) by 1 (they have a single temporal patch anyway).
    """
    steps = torch.ones(grid_thw.shape[0], dtype=torch.float64)
    if seconds_per_grid is not None:
        sec = seconds_per_grid.detach().cpu().double().reshape(-1)
        steps = torch.where(sec > 0, tokens_per_second * sec, steps)
    return steps


def _image_grid_positions(t: int, h: int, w: int, step: float, merge: int) -> Tensor:
    """[3, t*h*w/merge^2] (t, h, w) offsets of an image's tokens, t-major then row-major (the
    projector's output order)."""
    tt = (torch.arange(t, dtype=torch.float64) * step).long()
    grid = torch.meshgrid(tt, torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
    return torch.stack([g.flatten() for g in grid])


def casa_image_positions(grid_thw: Tensor, image_rows: Tensor, image_positions: Tensor,
                         position_ids: Tensor, merge: int, steps: Tensor) -> Tensor:
    """[3, n_image_tokens] long: window start + (t, h, w) for every image token, stream order.

    Images inserted at the same (row, position) share a window; each one starts, in time, one
    step after the previous one's last temporal position (frame order is visible).
    """
    grid = grid_thw.long().cpu()
    rows, pos = image_rows.long().cpu(), image_positions.long().cpu()
    starts = position_ids.long().cpu()[rows, pos]  # [n_img] text position of each window start
    out, prev_key, t_next = [], None, 0
    for k, (t, h, w) in enumerate(grid.tolist()):
        key = (int(rows[k]), int(pos[k]))
        if key != prev_key:
            prev_key, t_next = key, 0
        offsets = _image_grid_positions(t, h, w, float(steps[k]), merge)  # [3, n_k]
        offsets[0] += t_next
        t_next = int(offsets[0].max()) + 1
        out.append(offsets + starts[k])
    if not out:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(out, dim=1)


def insertion_positions(grid_thw: Tensor, image_rows: Tensor, image_positions: Tensor, position_ids: Tensor,
                        sample_starts: Optional[Tensor], text_index: Tensor, image_index: Tensor,
                        length: int, merge: int, steps: Tensor) -> Tensor:
    """[3, b, L] long: get_rope_index's positions over the combined insertion stream.

    Inside a packed sample the text advances by one per token and each image by
    ``max(h, w) / merge`` (transformers >= 5: the text after an image continues there); an
    image's tokens sit at ``P + (t * step, row, column)`` where ``P`` is the position the next
    text token would have had. ``text_index`` / ``image_index`` place them in the stream
    (``insertion.InsertionLayout``); stream padding gets 0.
    """
    b, s = position_ids.shape
    grid = grid_thw.long().cpu()
    rows, pos = image_rows.long().cpu(), image_positions.long().cpu()
    pid = position_ids.long().cpu()
    advance = (torch.maximum(grid[:, 1], grid[:, 2]) // merge) if grid.numel() else torch.zeros(0, dtype=torch.long)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), advance.cumsum(0)])  # [n_img+1] in stream order
    img_key = rows * s + pos  # [n_img] sorted (stream order)
    text_key = torch.arange(b * s)
    starts = torch.zeros(b, s, dtype=torch.bool) if sample_starts is None else sample_starts.bool().cpu().clone()
    starts[:, 0] = True
    col = torch.arange(s).expand(b, s)
    first = torch.cummax(torch.where(starts, col, torch.zeros_like(col)), dim=1).values  # [b, s]
    start_key = (text_key // s) * s + first.reshape(-1)  # [b*s] flat key of each token's sample start
    before_sample = cum[torch.searchsorted(img_key, start_key, right=False)]  # [b*s]
    text_pos = pid.reshape(-1) + cum[torch.searchsorted(img_key, text_key, right=True)] - before_sample

    out = torch.zeros(3, b * length, dtype=torch.long)
    out[:, text_index.cpu()] = text_pos
    img_tokens: List[Tensor] = []
    for k, (t, h, w) in enumerate(grid.tolist()):
        key = int(img_key[k])
        p = int(pid.reshape(-1)[key]) + int(cum[k]) - int(before_sample[key])
        img_tokens.append(_image_grid_positions(t, h, w, float(steps[k]), merge) + p)
    if img_tokens:
        out[:, image_index.cpu()] = torch.cat(img_tokens, dim=1)
    return out.view(3, b, length).to(position_ids.device)


def section_of_dims(section: List[int], head_dim: int, interleaved: bool) -> Tensor:
    """[head_dim] long in {0, 1, 2}: which position (t, h, w) rotates each rotary dimension.

    Frequency ``f`` (of ``head_dim / 2``) belongs to section 0 below ``section[0]``, 1 below
    ``section[0] + section[1]``, else 2; dimension ``j`` uses frequency ``j % (d/2)`` in the
    rotate-half layout and ``j // 2`` in the interleaved one.
    """
    half = head_dim // 2
    if sum(section) != half:
        raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {half}")
    j = torch.arange(head_dim)
    freq = j // 2 if interleaved else j % half
    bounds = torch.tensor([section[0], section[0] + section[1]])
    return torch.bucketize(freq, bounds, right=True)


def mrope_freqs(rotary, positions: Tensor, section: List[int]) -> Tensor:
    """positions [3, ...] -> rotary phases [..., 1, d] in the backbone's RoPE layout.

    ``rotary`` is our ``PositionRotary`` (megatron's ``RotaryEmbedding`` looked up per position);
    every dimension takes the phase of its section's position.
    """
    per_axis: Tuple[Tensor, ...] = tuple(rotary(positions[i]) for i in range(3))  # [..., 1, d] each
    d = per_axis[0].shape[-1]
    which = section_of_dims(section, d, getattr(rotary.rotary, "rotary_interleaved", False))
    which = which.to(per_axis[0].device)
    return torch.where(which == 0, per_axis[0], torch.where(which == 1, per_axis[1], per_axis[2]))

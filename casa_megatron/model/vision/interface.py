"""The vision-encoder interface every encoder implements, and the patch-count helpers.

Input convention (Qwen2.5-VL's): an image is a ``t x h x w`` grid of patches (``t`` temporal
patches of ``temporal_patch_size`` frames, ``h, w`` patches of 14 px, both even); its flattened
pixel patches ``[t*h*w, C*T*14*14]`` are ordered frame by frame and, inside a frame, *merge-group
first* (``[h/2, w/2, 2, 2]``), so every 4 consecutive patches form one 2x2 group that the
projector merges with a reshape. An image yields ``t*h*w/4`` tokens at the LM width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


def tokens_per_image(grid: Tensor, merge: int = 2) -> Tensor:
    """grid [n_img, 2] (h, w) or [n_img, 3] (t, h, w) in patches -> LM tokens per image [n_img]."""
    return grid.long().prod(dim=1) // (merge * merge)


def check_patches(pixel_patches: Tensor, grid_thw: Tensor, patch_dim: int) -> None:
    """Raise ValueError when the patch rows or width disagree with the grids."""
    expected = int(grid_thw.long().prod(dim=1).sum()) if grid_thw.numel() else 0
    if pixel_patches.shape[0] != expected:
        raise ValueError(f"pixel_patches has {pixel_patches.shape[0]} rows but image_grid_hw "
                         f"describes {expected} patches")
    if pixel_patches.dim() != 2 or pixel_patches.shape[1] != patch_dim:
        raise ValueError(f"pixel_patches rows have width {tuple(pixel_patches.shape[1:])} but the encoder "
                         f"expects C*T*p*p = {patch_dim} (model.vision.temporal_patch_size / patch_size)")


class VisionEncoder(MegatronModule, ABC):
    """pixel patches [n_patches, C*T*p*p] + grid_thw [n_img, 3] -> features [n_patches, hv],
    in the input's patch order (the projector merges 4 consecutive rows).

    Implementations keep their transformer blocks in ``self.blocks`` (a ModuleList) so
    freezing "all but the last k blocks" works for any encoder.
    """

    blocks: torch.nn.ModuleList
    merge: int  # spatial merge size: patches per side of one LM token
    patch_dim: int  # C*T*p*p

    @abstractmethod
    def forward(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor: ...

    def without_images(self, pixel_patches: Tensor) -> Tensor:
        """The features of a micro-batch without images ([0, hv]), after a forward of one
        blank image (one merge group of zero pixels) whose result joins them times zero.

        Why run anything: data parallelism that overlaps communication with compute needs every
        micro-batch to reach the same parameters in the same order. megatron's overlapped
        gradient reduction (``parallel.overlap_grad_reduce``) learns in the first step which
        parameters produce a gradient in the last micro-batch and launches a bucket's
        reduce-scatter once all of them have (a block weight without one leaves its bucket
        waiting: the step fails); its overlapped parameter gather (``overlap_param_gather``)
        waits for a bucket's all-gather in the forward pre-hooks of the modules that use it, in
        forward order (blocks that do not run leave their gather pending: stale weights, then a
        failed assertion). The blank image's contribution is exactly zero: the loss and every
        gradient are those of skipping the encoder, whose gradients are zero anyway."""
        blank = pixel_patches.new_zeros(self.merge * self.merge, self.patch_dim)  # [merge^2, C*T*p*p]
        grid = torch.tensor([[1, self.merge, self.merge]], device=pixel_patches.device)  # t, h, w
        features = self(blank, grid)  # [merge^2, hv]
        return features[:0] + 0 * features.sum()  # [0, hv]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Per block: megatron's default would treat the ModuleList as replicated tensors,
        which is wrong for TP-sharded block weights."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        tp_group = parallel_state.get_tensor_model_parallel_group()  # replica ids need the TP rank
        sharded = {}
        for name, child in self.named_children():
            children = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
            for idx, module in children:
                sub = f"{prefix}{name}." if idx is None else f"{prefix}{name}.{idx}."
                sharded.update(sharded_state_dict_default(module, sub, sharded_offsets, metadata, tp_group))
        return sharded

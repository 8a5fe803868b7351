"""The vision-encoder interface every encoder implements, and the patch-count helpers.

Input convention (Qwen2.5-VL's): an image is a ``t x h x w`` grid of patches (``t`` temporal
patches of ``temporal_patch_size`` frames, ``h, w`` patches of 14 px, both even); its flattened
pixel patches ``[t*h*w, C*T*14*14]`` are ordered frame by frame and, inside a frame, *merge-group
first* (``[h/2, w/2, 2, 2]``), so every 4 consecutive patches form one 2x2 group that the
projector merges with a reshape. An image yields ``t*h*w/4`` tokens at the LM width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Tuple

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import Tensor

from casa_megatron.model.init_seed import component_seed


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

    Pipeline part. An encoder may be one part of the whole (``parallel.vision_blocks_per_pipeline_stage``):
    the global blocks ``block_offset .. block_offset + len(blocks) - 1``; the first part also
    embeds the patches, the last one also finishes (final norm, patch order). The whole encoder
    is ``finish(run_blocks(embed(...)))`` with one :meth:`plan` of the batch's geometry, which
    every part recomputes from the grids alone. Each piece draws its initial weights from its
    own seed (``vision.patch_embed``, ``vision.blocks.<global index>``, ...: model/init_seed.py),
    so a split encoder starts from the same weights as a whole one.
    """

    blocks: torch.nn.ModuleList
    merge: int  # spatial merge size: patches per side of one LM token
    patch_dim: int  # C*T*p*p
    block_offset: int = 0  # global index of this part's first block
    first_part: bool = True  # embeds the patches
    last_part: bool = True  # finishes the features

    def _build_part(self, config, vision, layer_spec, blocks: Optional[range], seed: Optional[int],
                    pg_collection, patch_bias: bool) -> int:
        """What every encoder builds of its part: the roles, the patch embedding (first part: a
        linear over the flattened ``[C, T, p, p]`` patch) and the blocks ``blocks`` (all by
        default), each under its own seed. Returns the seed (for the part's other pieces)."""
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        blocks = range(config.num_layers) if blocks is None else blocks
        seed = torch.initial_seed() if seed is None else seed
        self.block_offset, self.first_part = blocks.start, blocks.start == 0
        self.last_part = blocks.stop == config.num_layers
        self.merge, self.recompute, self.patch_dim = vision.spatial_merge_size, vision.recompute, vision.patch_dim
        if self.first_part:
            with component_seed(seed, "vision.patch_embed"):
                self.patch_embed = torch.nn.Linear(self.patch_dim, config.hidden_size, bias=patch_bias,
                                                   dtype=config.params_dtype)
        built = []
        for i in blocks:
            with component_seed(seed, f"vision.blocks.{i}"):
                built.append(build_module(layer_spec, config=config, layer_number=i + 1, pg_collection=pg_collection))
        self.blocks = torch.nn.ModuleList(built)
        self._zero_padded_units(vision, pg_collection.tp.rank())
        return seed

    @torch.no_grad()
    def _zero_padded_units(self, vision, tp_rank: int) -> None:
        """The MLP units past ``ffn_hidden_size`` (``model.vision.ffn_pad_multiple``) start as the
        exact no-ops an import makes them: zero gate / up rows and biases, zero down-projection
        columns. Zero rows get zero gradients, so they stay no-ops, and the export can slice them
        off; a from-scratch encoder would otherwise train units the HF format has no room for."""
        ffn = vision.ffn_hidden_size
        if vision.padded_ffn_hidden_size == ffn:
            return
        for block in self.blocks:
            fc1, fc2 = block.mlp.linear_fc1, block.mlp.linear_fc2
            local = fc2.weight.shape[1]  # this rank's units: global tp_rank * local ...
            kept = min(max(ffn - tp_rank * local, 0), local)
            fc2.weight[:, kept:] = 0
            for param in (fc1.weight, getattr(fc1, "bias", None)):
                if param is not None and param.numel():
                    for part in param.view(-1, local, *param.shape[1:]):  # [gate; up] or one part
                        part[kept:] = 0

    @abstractmethod
    def plan(self, grid_thw: Tensor, device) -> Any:
        """What every part needs of the batch's geometry (positions, attention segments, order)."""

    @abstractmethod
    def embed(self, pixel_patches: Tensor, plan: Any) -> Tensor:
        """First part: pixel patches -> block input [n, hv] (in the blocks' patch order)."""

    @abstractmethod
    def run_blocks(self, x: Tensor, plan: Any) -> Tensor:
        """This part's blocks: [n, hv] -> [n, hv]."""

    @abstractmethod
    def finish(self, x: Tensor, plan: Any) -> Tensor:
        """Last part: the last block's output -> features [n, hv] in the input's patch order."""

    def normalized_grid(self, grid_thw: Tensor) -> Tensor:
        """The grids as ``[n_img, 3]`` (t, h, w), refusing what this encoder cannot embed."""
        return grid_thw

    def forward(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor:
        # pixel_patches [n, C*T*p*p], grid_thw [n_img, 3] -> [n, hv]; the whole encoder
        if not (self.first_part and self.last_part):
            raise RuntimeError("this vision encoder is one pipeline part; run embed / run_blocks / finish")
        grid_thw = self.normalized_grid(grid_thw)
        check_patches(pixel_patches, grid_thw, self.patch_dim)
        if pixel_patches.shape[0] == 0:  # megatron's attention cannot take 0 rows; see without_images
            return self.without_images(pixel_patches)
        plan = self.plan(grid_thw, pixel_patches.device)
        return self.finish(self.run_blocks(self.embed(pixel_patches, plan), plan), plan)

    def blank_input(self, device) -> Tuple[Tensor, Tensor]:
        """One blank image (one merge group of zero pixels): patches [merge^2, C*T*p*p], grid [1, 3]."""
        blank = torch.zeros(self.merge * self.merge, self.patch_dim, device=device)
        grid = torch.tensor([[1, self.merge, self.merge]], device=device)  # t, h, w
        return blank, grid

    def without_images(self, pixel_patches: Tensor) -> Tensor:
        """The features of a micro-batch without images ([0, hv]), after a forward of one
        blank image (:meth:`blank_input`) whose result joins them times zero.

        Why run anything: data parallelism that overlaps communication with compute needs every
        micro-batch to reach the same parameters in the same order. megatron's overlapped
        gradient reduction (``parallel.overlap_grad_reduce``) learns in the first step which
        parameters produce a gradient in the last micro-batch and launches a bucket's
        reduce-scatter once all of them have (a block weight without one leaves its bucket
        waiting: the step fails); its overlapped parameter gather (``overlap_param_gather``)
        waits for a bucket's all-gather in the forward pre-hooks of the modules that use it, in
        forward order (blocks that do not run leave their gather pending: stale weights, then a
        failed assertion). The blank image's contribution is exactly zero: the loss and every
        gradient are those of skipping the encoder, whose gradients are zero anyway. A split
        encoder carries the blank image through all its parts (``model/vlm.py``)."""
        blank, grid = self.blank_input(pixel_patches.device)
        features = self(blank.to(pixel_patches.dtype), grid)  # [merge^2, hv]
        return features[:0] + 0 * features.sum()  # [0, hv]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Per block: megatron's default would treat the ModuleList as replicated tensors,
        which is wrong for TP-sharded block weights. Blocks are keyed by their global index."""
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import sharded_state_dict_default

        tp_group = parallel_state.get_tensor_model_parallel_group()  # replica ids need the TP rank
        sharded = {}
        for name, child in self.named_children():
            children = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
            for idx, module in children:
                sub = f"{prefix}{name}." if idx is None else f"{prefix}{name}.{idx}."
                part = sharded_state_dict_default(module, sub, sharded_offsets, metadata, tp_group)
                if child is self.blocks and self.block_offset:
                    # the checkpoint key of a block is its global index (checkpoints reshard across
                    # encoder splits); the dict key stays the local name load_state_dict expects
                    replace_prefix_for_sharding(part, sub, f"{prefix}{name}.{idx + self.block_offset}.")
                sharded.update(part)
        return sharded

"""The Qwen2.5-VL vision transformer from megatron-core layers (its patch merger is our projector).

Same function as transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` up to the merger:

- patch embedding: HF's Conv3d (kernel = stride = ``T x 14 x 14``, no bias) is a linear map of
  each flattened ``[C, T, 14, 14]`` patch, so it is stored and run as a ``Linear``;
- 2D RoPE (theta 1e4) on the patch row / column, in merge-group order (``geometry.rotary_2d``);
- blocks = megatron ``TransformerLayer``: RMSNorm, fused QKV with bias, SwiGLU with biases;
  attention per 112 px window, or per frame in ``fullatt_block_indexes``, through the varlen
  packed core attention (``model/packed_attention.py``, non-causal): no dense mask;
- tensor parallel like any megatron layer: heads split over TP, the MLP width padded with exact
  zero units to ``model.vision.ffn_pad_multiple`` so that 3420 splits over TP = 8.

Window attention needs the patches of a window to be contiguous: the merge groups are permuted
into window order once before the first block and back after the last one, so the output keeps
the input order (HF permutes back after its merger, which is the same thing because the merger
acts on each merge group alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.config.schema import VisionConfig
from casa_megatron.model.recompute import run_layers
from casa_megatron.model.vision.geometry import (
    Segments,
    frame_segments,
    patch_coords,
    rotary_2d,
    window_partition,
)
from casa_megatron.model.vision.interface import VisionEncoder


@dataclass
class QwenPlan:
    """A micro-batch's geometry, recomputed by every pipeline part from the grids alone."""

    freqs: Tensor  # [n, 1, 1, hd] 2D RoPE, in block order
    order: Optional[Tensor]  # [n] block order -> input order permutation (window attention), or None
    full: object  # packed segments: one per frame
    windows: object  # packed segments: one per window (None without window attention)


class QwenVisionEncoder(VisionEncoder):
    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec,
                 pg_collection: Optional[ProcessGroupCollection] = None, blocks: Optional[range] = None,
                 seed: Optional[int] = None):
        """``blocks``: the global block indices this pipeline part holds (all by default); the
        part holding block 0 embeds the patches, the one holding the last block finishes."""
        super().__init__(config=config)
        self._build_part(config, vision, layer_spec, blocks, seed, pg_collection, patch_bias=False)
        self.head_dim = vision.hidden_size // vision.num_attention_heads
        self.rope_theta = vision.rope_theta
        self.window_units = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
        full = vision.fullatt_block_indexes
        self.full_blocks: List[int] = list(range(config.num_layers)) if full is None else sorted(full)
        self.windowed = len(self.full_blocks) < config.num_layers

    def plan(self, grid_thw: Tensor, device) -> QwenPlan:
        rows, cols, _ = patch_coords(grid_thw, self.merge)
        freqs = rotary_2d(rows, cols, self.head_dim, self.rope_theta)  # [n, 1, 1, hd]
        full = Segments(frame_segments(grid_thw)).packed(device)
        order = windows = None
        if self.windowed:
            # Window attention needs a window's patches contiguous: merge groups in window order.
            unit_order, cu_windows = window_partition(grid_thw, self.merge, self.window_units)
            group = self.merge * self.merge
            order = (unit_order[:, None] * group + torch.arange(group)).flatten()  # [n]
            freqs = freqs[order]
            order = order.to(device)
            windows = Segments(cu_windows).packed(device)
        return QwenPlan(freqs=freqs.to(device), order=order, full=full, windows=windows)

    def embed(self, pixel_patches: Tensor, plan: QwenPlan) -> Tensor:
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))  # [n, hv]
        return x if plan.order is None else x[plan.order]  # [n, hv] in window order

    def run_blocks(self, x: Tensor, plan: QwenPlan) -> Tensor:
        segments = {block: plan.full if (self.block_offset + i) in self.full_blocks or not self.windowed
                    else plan.windows for i, block in enumerate(self.blocks)}

        def call(block, h: Tensor) -> Tensor:
            return block(hidden_states=h, attention_mask=None, rotary_pos_emb=plan.freqs,
                         packed_seq_params=segments[block])[0]

        # [n, 1, hv] through the blocks, recomputed as model.vision.recompute says
        return run_layers(self.blocks, x[:, None], call, self.recompute, self.config)[:, 0]  # [n, hv]

    def finish(self, x: Tensor, plan: QwenPlan) -> Tensor:
        return x if plan.order is None else x[torch.argsort(plan.order)]  # back to the input order

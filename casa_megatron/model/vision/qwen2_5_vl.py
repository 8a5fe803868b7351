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

from typing import List, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
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
from casa_megatron.model.vision.interface import VisionEncoder, check_patches


class QwenVisionEncoder(VisionEncoder):
    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.merge = vision.spatial_merge_size
        self.recompute = vision.recompute
        self.patch_dim = vision.patch_dim
        self.head_dim = vision.hidden_size // vision.num_attention_heads
        self.rope_theta = vision.rope_theta
        self.window_units = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
        full = vision.fullatt_block_indexes
        self.full_blocks: List[int] = list(range(config.num_layers)) if full is None else sorted(full)
        self.patch_embed = torch.nn.Linear(self.patch_dim, config.hidden_size, bias=False,
                                           dtype=config.params_dtype)
        self.blocks = torch.nn.ModuleList([
            build_module(layer_spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
            for i in range(config.num_layers)
        ])

    def forward(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor:
        # pixel_patches [n, C*T*p*p], grid_thw [n_img, 3] -> [n, hv]
        check_patches(pixel_patches, grid_thw, self.patch_dim)
        if pixel_patches.shape[0] == 0:  # megatron's attention cannot take 0 rows; see without_images
            return self.without_images(pixel_patches)
        rows, cols, _ = patch_coords(grid_thw, self.merge)
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))  # [n, hv]
        freqs = rotary_2d(rows, cols, self.head_dim, self.rope_theta)  # [n, 1, 1, hd]
        full = Segments(frame_segments(grid_thw)).packed(x.device)
        windowed = len(self.full_blocks) < len(self.blocks)
        if windowed:
            unit_order, cu_windows = window_partition(grid_thw, self.merge, self.window_units)
            group = self.merge * self.merge
            order = (unit_order[:, None] * group + torch.arange(group)).flatten().to(x.device)  # [n]
            x, freqs = x[order], freqs[order.cpu()]
            windows = Segments(cu_windows).packed(x.device)
        freqs = freqs.to(x.device)
        x = x[:, None]  # [n, 1, hv]
        segments = {block: full if i in self.full_blocks or not windowed else windows
                    for i, block in enumerate(self.blocks)}

        def call(block, h: Tensor) -> Tensor:
            return block(hidden_states=h, attention_mask=None, rotary_pos_emb=freqs,
                         packed_seq_params=segments[block])[0]

        x = run_layers(self.blocks, x, call, self.recompute, self.config)  # as model.vision.recompute says
        x = x[:, 0]  # [n, hv]
        if windowed:
            x = x[torch.argsort(order)]  # back to the input order
        return x

"""A small ViT from megatron-core layers, for tests and CPU runs (parameters trained from scratch).

Patch embedding (a linear with bias over the flattened patch), fixed 2D sin-cos positions,
bidirectional attention within each image (one varlen segment per image: no mask over the
micro-batch), final RMSNorm. Its parameter names are part of the checkpoint format: keep them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.config.schema import VisionConfig
from casa_megatron.model.init_seed import component_seed
from casa_megatron.model.recompute import run_layers
from casa_megatron.model.vision.geometry import Segments, frame_segments, patch_coords
from casa_megatron.model.vision.interface import VisionEncoder


def _sincos_2d(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """Fixed 2D sin-cos position features [n, dim]: no parameters, any grid size."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coord in (rows, cols):
        angle = coord.float()[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    out = torch.cat(parts, dim=-1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[-1]))


@dataclass
class TinyPlan:
    rows: Tensor  # [n] patch row of each patch
    cols: Tensor  # [n]
    segments: object  # packed segments: one per image


class TinyViT(VisionEncoder):
    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec,
                 final_norm, pg_collection: Optional[ProcessGroupCollection] = None,
                 blocks: Optional[range] = None, seed: Optional[int] = None):
        """``blocks``: the global block indices this pipeline part holds (all by default)."""
        super().__init__(config=config)
        seed = self._build_part(config, vision, layer_spec, blocks, seed, pg_collection, patch_bias=True)
        if self.last_part:
            with component_seed(seed, "vision.final_layernorm"):
                self.final_layernorm = build_module(final_norm, config=config, hidden_size=config.hidden_size,
                                                    eps=config.layernorm_epsilon)

    def normalized_grid(self, grid_thw: Tensor) -> Tensor:
        if grid_thw.shape[-1] == 3 and bool((grid_thw[:, 0] != 1).any()):
            raise ValueError("tiny_vit embeds single frames: every image needs t = 1 temporal patch")
        return grid_thw if grid_thw.shape[-1] == 3 else torch.nn.functional.pad(grid_thw, (1, 0), value=1)

    def plan(self, grid_thw: Tensor, device) -> TinyPlan:
        grid_thw = self.normalized_grid(grid_thw)
        rows, cols, _ = patch_coords(grid_thw, self.merge)
        return TinyPlan(rows=rows, cols=cols, segments=Segments(frame_segments(grid_thw)).packed(device))

    def embed(self, pixel_patches: Tensor, plan: TinyPlan) -> Tensor:
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))  # [n, hv]
        return x + _sincos_2d(plan.rows, plan.cols, x.shape[-1]).to(device=x.device, dtype=x.dtype)

    def run_blocks(self, x: Tensor, plan: TinyPlan) -> Tensor:
        # bidirectional attention within each image; [n, 1, hv] through the blocks, recomputed
        # as model.vision.recompute says
        x = run_layers(self.blocks, x[:, None], lambda block, h: block(hidden_states=h, attention_mask=None,
                                                                        packed_seq_params=plan.segments)[0],
                       self.recompute, self.config)
        return x[:, 0]  # [n, hv]

    def finish(self, x: Tensor, plan: TinyPlan) -> Tensor:
        return self.final_layernorm(x)  # [n, hv]

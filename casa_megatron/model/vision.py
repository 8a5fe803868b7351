"""Vision side: an encoder interface, a small megatron-core ViT, and the patch-merging projector.

Input convention (Qwen2.5-VL style): an image is a grid of ``h x w`` patches of 14 px (h, w
even); its flattened pixel patches ``[h*w, C*14*14]`` are ordered *merge-group first*
(``[h/2, w/2, 2, 2]``), so every 4 consecutive patches form one 2x2 group and the projector
can merge them with a reshape. An image yields ``h*w/4`` tokens at the LM width.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.config.schema import VisionConfig


def tokens_per_image(grid_hw: Tensor, merge: int = 2) -> Tensor:
    """grid_hw [n_img, 2] (patches) -> LM tokens per image [n_img]."""
    return (grid_hw[:, 0] * grid_hw[:, 1]) // (merge * merge)


class VisionEncoder(MegatronModule, ABC):
    """pixel patches [n_patches, C*p*p] + grid [n_img, 2] -> features [n_patches, hv].

    Implementations keep their transformer blocks in ``self.blocks`` (a ModuleList) so
    freezing "all but the last k blocks" works for any encoder.
    """

    blocks: torch.nn.ModuleList

    @abstractmethod
    def forward(self, pixel_patches: Tensor, grid_hw: Tensor) -> Tensor: ...


def _patch_coords(grid_hw: Tensor, merge: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Row, column and image index of every patch, in merge-group-first order."""
    rows, cols, image_ids = [], [], []
    for idx, (h, w) in enumerate(grid_hw.tolist()):
        if h % merge or w % merge:
            raise ValueError(f"image {idx}: patch grid {h}x{w} is not a multiple of the {merge}x{merge} merge")
        gi, gj, di, dj = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge),
                                        torch.arange(merge), torch.arange(merge), indexing="ij")
        rows.append((gi * merge + di).flatten())
        cols.append((gj * merge + dj).flatten())
        image_ids.append(torch.full((h * w,), idx))
    return torch.cat(rows), torch.cat(cols), torch.cat(image_ids)


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


class TinyViT(VisionEncoder):
    """A small ViT from megatron-core layers: patch embedding, 2D sin-cos positions,
    bidirectional attention within each image (block-diagonal mask), final RMSNorm."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec,
                 final_norm, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.merge = vision.spatial_merge_size
        patch_dim = vision.in_channels * vision.patch_size ** 2
        self.patch_embed = torch.nn.Linear(patch_dim, config.hidden_size, bias=True)
        self.blocks = torch.nn.ModuleList([
            build_module(layer_spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
            for i in range(config.num_layers)
        ])
        self.final_layernorm = build_module(final_norm, config=config, hidden_size=config.hidden_size,
                                            eps=config.layernorm_epsilon)

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

    def forward(self, pixel_patches: Tensor, grid_hw: Tensor) -> Tensor:
        expected = int((grid_hw[:, 0] * grid_hw[:, 1]).sum())
        if pixel_patches.shape[0] != expected:
            raise ValueError(f"pixel_patches has {pixel_patches.shape[0]} rows but image_grid_hw "
                             f"describes {expected} patches")
        if expected == 0:  # a text-only micro-batch: no patches, no features
            return pixel_patches.new_zeros(0, self.patch_embed.out_features, dtype=self.patch_embed.weight.dtype)
        rows, cols, image_ids = _patch_coords(grid_hw.cpu(), self.merge)
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))  # [n, hv]
        x = x + _sincos_2d(rows, cols, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        image_ids = image_ids.to(x.device)
        mask = (image_ids[:, None] != image_ids[None, :])[None, None]  # [1, 1, n, n], True = masked
        x = x[:, None]  # [n, 1, hv]
        for block in self.blocks:
            x, _ = block(hidden_states=x, attention_mask=mask)
        return self.final_layernorm(x)[:, 0]  # [n, hv]


class PatchMergerProjector(MegatronModule):
    """Norm, 2x2 merge (4 consecutive patches -> one token) and an MLP to the LM width."""

    def __init__(self, config: TransformerConfig, vision_hidden: int, merge: int, submodules,
                 norm, norm_eps: float, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.group = merge * merge
        self.norm = build_module(norm, config=config, hidden_size=vision_hidden, eps=norm_eps)
        self.mlp = MultimodalProjector(config, submodules, "mlp", vision_hidden * self.group,
                                       tp_group=pg_collection.tp)

    def forward(self, features: Tensor) -> Tensor:
        # features [n, hv] -> [n/4, 1, 4*hv] -> [n/4, h]
        merged = self.norm(features).reshape(-1, 1, features.shape[-1] * self.group)
        return self.mlp(merged)[:, 0]

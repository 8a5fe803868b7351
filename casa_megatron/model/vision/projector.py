"""The patch-merging projector: norm, 2x2 merge (4 consecutive patches -> one token), MLP to the
LM width. With the Qwen2.5-VL encoder it *is* Qwen2.5-VL's patch merger (``ln_q`` + GELU MLP of
width ``hidden * 4``); the encoder returns patches in input order, so merging here equals HF's
merge-then-unpermute."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class PatchMergerProjector(MegatronModule):
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

"""``model.vision`` -> the encoder and the projector modules (layer structure from ``specs.py``)."""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from casa_megatron.config.schema import VisionConfig
from casa_megatron.model import specs
from casa_megatron.model.vision.interface import VisionEncoder
from casa_megatron.model.vision.projector import PatchMergerProjector
from casa_megatron.model.vision.qwen2_5_vl import QwenVisionEncoder
from casa_megatron.model.vision.tiny_vit import TinyViT


def build_vision_encoder(vision: VisionConfig, config: TransformerConfig, use_te: bool,
                         attention_backend: str = "auto", blocks: Optional[range] = None,
                         seed: Optional[int] = None) -> VisionEncoder:
    """``blocks``: the global block indices of this pipeline part (all by default)."""
    spec = specs.vision_layer_spec(use_te, attention_backend)
    if vision.encoder == "qwen2_5_vl":
        return QwenVisionEncoder(config, vision, spec, blocks=blocks, seed=seed)
    if vision.encoder == "tiny_vit":
        return TinyViT(config, vision, spec, specs.final_norm_spec(use_te), blocks=blocks, seed=seed)
    raise ValueError(f"model.vision.encoder={vision.encoder!r} is not built here")


def build_projector(vision: VisionConfig, config: TransformerConfig, use_te: bool) -> PatchMergerProjector:
    """``config``: the projector's TransformerConfig (``projector_transformer_config``)."""
    return PatchMergerProjector(config, vision.hidden_size, vision.spatial_merge_size,
                                specs.projector_submodules(use_te), specs.final_norm_spec(use_te),
                                vision.norm_epsilon)

"""Vision side: encoders behind one interface (``interface.py``), the small ``tiny_vit`` and the
Qwen2.5-VL ViT (``qwen2_5_vl.py``), their shared geometry (patch coordinates, segments, 2D RoPE,
windows) and the patch-merging projector."""

from casa_megatron.model.vision.build import build_projector, build_vision_encoder
from casa_megatron.model.vision.interface import VisionEncoder, tokens_per_image
from casa_megatron.model.vision.projector import PatchMergerProjector
from casa_megatron.model.vision.qwen2_5_vl import QwenVisionEncoder
from casa_megatron.model.vision.tiny_vit import TinyViT

__all__ = ["PatchMergerProjector", "QwenVisionEncoder", "TinyViT", "VisionEncoder", "build_projector",
           "build_vision_encoder", "tokens_per_image"]

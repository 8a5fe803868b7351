"""A tiny random transformers Qwen2.5-VL vision tower (the oracle) and our encoder + projector
built from the same HF config and weights through the conversion table (``tables/vision.py``)."""

from __future__ import annotations

import torch

# Three images of different sizes (windows cut at the edges: 5x7 and 6x10 merged tokens with
# 4x4-token windows) and a 3-temporal-patch video (6 frames) in one micro-batch.
GRID_THW = torch.tensor([[1, 10, 14], [1, 4, 6], [3, 8, 8], [1, 12, 20]])
OUT_HIDDEN = 48


def hf_vision_config(intermediate_size: int = 45):
    """Odd MLP width on purpose: padded to 48 so that it splits over TP=2."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    return Qwen2_5_VLVisionConfig(depth=4, hidden_size=64, num_heads=4, intermediate_size=intermediate_size,
                                  out_hidden_size=OUT_HIDDEN, fullatt_block_indexes=[1, 3], window_size=112,
                                  tokens_per_second=2, patch_size=14, temporal_patch_size=2,
                                  spatial_merge_size=2, in_channels=3)


def hf_vision_model(seed: int = 0, intermediate_size: int = 45):
    """transformers' vision tower with every weight randomised (no zero bias, no unit norm)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    cfg = hf_vision_config(intermediate_size)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norms: around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def hf_visual_state(model) -> dict:
    """The tower's tensors under their hub names (``visual.*``)."""
    return {f"visual.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def hf_to_megatron(names, model_cfg, hf_tensors: dict) -> dict:
    """Full (TP=1) tensors of our ``names`` from HF ``visual.*`` tensors, by the vision and
    projector tables."""
    from casa_megatron.conversion.engine import import_tensors
    from casa_megatron.conversion.safetensors_io import DictReader
    from casa_megatron.conversion.tables import projector_table, vision_table

    tables = {"vision": vision_table(model_cfg), "projector": projector_table()}
    return dict(import_tensors(names, tables, DictReader(hf_tensors)))


def model_config_for(hf_cfg, **overrides):
    """Our ModelConfig whose vision part comes from the HF config (LM width = merger output)."""
    from casa_megatron.config import LanguageModelConfig, ModelConfig, VisionConfig
    from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf

    vision = VisionConfig(**vision_config_from_hf(hf_cfg.to_dict()))
    lm = LanguageModelConfig(vocab_size=64, num_layers=2, hidden_size=OUT_HIDDEN, num_attention_heads=4,
                             num_query_groups=2, ffn_hidden_size=64)
    return ModelConfig(lm=lm, vision=vision, transformer_impl="local", **overrides)


class VisionStack(torch.nn.Module):
    """Our encoder + projector under the VLM's attribute names (``vision.*``, ``projector.*``)."""

    def __init__(self, model_cfg, tp: int, params_dtype=torch.float32):
        super().__init__()
        from casa_megatron.config import ParallelConfig
        from casa_megatron.model.transformer_config import (
            lm_transformer_config,
            projector_transformer_config,
            vision_transformer_config,
        )
        from casa_megatron.model.vision import build_projector, build_vision_encoder

        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        v = model_cfg.vision
        self.vision = build_vision_encoder(v, vision_transformer_config(model_cfg, parallel, params_dtype), False)
        lm_cfg = lm_transformer_config(model_cfg, parallel, params_dtype)
        width = v.projector_width(model_cfg.lm.hidden_size)
        self.projector = build_projector(v, projector_transformer_config(lm_cfg, width), False)

    def forward(self, pixels, grid_thw):
        return self.projector(self.vision(pixels, grid_thw))  # [n/4, h]


def random_pixels(grid_thw, patch_dim: int, seed: int = 3):
    n = int(grid_thw.prod(dim=1).sum())
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed))

"""Build the VLM stage this rank holds from the typed configs."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from casa_megatron.config.schema import ModelConfig, ParallelConfig
from casa_megatron.model.transformer_config import (
    lm_transformer_config,
    projector_transformer_config,
    vision_transformer_config,
)
from casa_megatron.model.vlm import CASAVLM


def build_vlm(model: ModelConfig, parallel: ParallelConfig, image_seq_length: int,
              params_dtype: torch.dtype = torch.float32) -> CASAVLM:
    model.validate()
    parallel.validate(model)
    lm_cfg = lm_transformer_config(model, parallel, params_dtype)
    vlm = CASAVLM(
        model, lm_cfg, vision_transformer_config(model, parallel, params_dtype),
        projector_transformer_config(lm_cfg), image_seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        vlm.cuda(torch.cuda.current_device())
    return vlm

"""Build the VLM stage this rank holds from the typed configs.

``model.fusion.mechanism`` picks the model class: ``casa`` and ``cross_attention`` are
:class:`CASAVLM` (the attention module differs), ``insertion`` is :class:`InsertionVLM`. All
share the embedding, vision encoder, projector, LM layers and output layer, so one backbone
loads into each and comparisons are fair.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state

from casa_megatron.config.schema import ModelConfig, ParallelConfig
from casa_megatron.model.chunks import ModelChunks
from casa_megatron.model.insertion import InsertionVLM
from casa_megatron.model.lora import attach_lora
from casa_megatron.model.recompute import recompute_modules
from casa_megatron.model.transformer_config import (
    lm_transformer_config,
    projector_transformer_config,
    vision_transformer_config,
)
from casa_megatron.model.vlm import CASAVLM


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, image_seq_length: int,
                       params_dtype: torch.dtype = torch.float32, precision=None) -> ModelChunks:
    """This rank's model chunks: one stage, or ``parallel.virtual_pipeline_model_parallel_size``
    chunks for the interleaved schedule (chunk ``v`` of rank ``r`` is virtual stage ``v * pp + r``)."""
    vp = parallel.virtual_pipeline_model_parallel_size
    return ModelChunks([build_vlm(model, parallel, image_seq_length, params_dtype, precision, vp_stage=v)
                        for v in (range(vp) if vp else [None])])


def build_vlm(model: ModelConfig, parallel: ParallelConfig, image_seq_length: int,
              params_dtype: torch.dtype = torch.float32, precision=None, skip_init=(),
              vp_stage: Optional[int] = None) -> CASAVLM:
    """``precision`` (a PrecisionConfig) turns on FP8 through Transformer Engine for the LM.
    ``vp_stage``: which model chunk of this rank to build under the interleaved schedule
    (``build_model_chunks``); None: the rank's whole stage.

    ``skip_init``: components (``"lm"``, ``"vision"`` (the encoder), ``"projector"``) whose megatron
    weights are only allocated, not initialised, because the caller overwrites them all (the
    HF importer: initialising 3B parameters it then replaces cost it half its time and ~2 GB of
    allocator memory from the fp32 init copies)."""
    model.validate()
    parallel.validate(model)
    lm_cfg = lm_transformer_config(model, parallel, params_dtype)
    if precision is not None and precision.fp8:
        lm_cfg = dataclasses.replace(lm_cfg, fp8=precision.fp8, fp8_recipe=precision.fp8_recipe)
    vision_cfg = vision_transformer_config(model, parallel, params_dtype)
    projector_cfg = projector_transformer_config(lm_cfg, model.vision.projector_width(model.lm.hidden_size))
    if "vision" in skip_init:
        vision_cfg = dataclasses.replace(vision_cfg, perform_initialization=False)
    if "projector" in skip_init:
        projector_cfg = dataclasses.replace(projector_cfg, perform_initialization=False)
    if "lm" in skip_init:
        lm_cfg = dataclasses.replace(lm_cfg, perform_initialization=False)
    cls = InsertionVLM if model.fusion.mechanism == "insertion" else CASAVLM
    seed = torch.initial_seed()  # the run's seed, before the components fork their own
    vlm = cls(
        model, lm_cfg, vision_cfg, projector_cfg, image_seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        vision_blocks=parallel.stage_vision_blocks(model.vision.num_layers),
        vp_stage=vp_stage,
    )
    if model.fusion.cross_attention_gate:
        _add_gates(vlm)
    if model.lora.enabled or model.vision.lora.enabled:
        _add_lora(vlm, model, lm_cfg, vision_cfg, seed)
    recompute_modules(vlm.decoder.layers, model.recompute, lm_cfg)  # selective recomputation (if asked)
    if hasattr(vlm, "vision"):
        recompute_modules(vlm.vision.blocks, model.vision.recompute, vision_cfg)
    if torch.cuda.is_available():
        vlm.cuda(torch.cuda.current_device())
    return vlm


def _add_lora(vlm: CASAVLM, model: ModelConfig, lm_cfg, vision_cfg, seed: int) -> None:
    """LoRA adapters on this stage's LM layers and encoder blocks (model/lora.py), tagged new and
    trainable."""
    if model.lora.enabled:
        attach_lora(vlm.decoder.layers, vlm.decoder.layer_offset, model.lora, lm_cfg, seed)
    if model.vision.lora.enabled and hasattr(vlm, "vision"):
        attach_lora(vlm.vision.blocks, vlm.vision.block_offset, model.vision.lora, vision_cfg, seed,
                    prefix="vision.blocks", real_ffn=model.vision.ffn_hidden_size)
    vlm._tag_new_parameters()
    vlm.apply_freezing()


def _add_gates(vlm: CASAVLM) -> None:
    """Give every fusion layer its tanh gate (alpha = 0), then re-run the tagging / freezing
    that CASAVLM did in its constructor so alpha is a ``casa_new``, trainable parameter.
    (The layer spec could pass ``gate=True`` instead; ``CASATransformerLayer`` accepts it.)"""
    for layer in vlm.casa_layers():
        layer.add_gate()
    vlm._tag_new_parameters()
    vlm.apply_freezing()

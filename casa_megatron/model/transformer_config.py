"""Translate our dataclasses into megatron-core ``TransformerConfig`` objects.

Three configs: the LM (pipelined), the vision encoder (never sequence-parallel; on the first
stage, or over the first few with ``parallel.vision_blocks_per_pipeline_stage``, where the model
places its blocks itself) and the projector (an MLP from merged patches to the LM width).
On CPU, initialisation happens on the CPU from the global seed (``use_cpu_initialization``),
so every TP/PP layout draws the *same* full weights and then keeps its shard.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from casa_megatron.config.pipeline_split import megatron_layout
from casa_megatron.config.schema import ModelConfig, ParallelConfig


def _common(parallel: ParallelConfig, params_dtype: torch.dtype) -> dict:
    on_gpu = torch.cuda.is_available()
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        normalization="RMSNorm",
    )


def lm_transformer_config(model: ModelConfig, parallel: ParallelConfig,
                          params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    lm = model.lm
    split = dict(num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
                 num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
                 # model chunks per rank: megatron's get_num_layers_to_build / offset read it
                 virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size)
    if parallel.virtual_pipeline_model_parallel_size:
        # The interleaved schedule sends forward and backward in one exchange. Batched, at PP=2
        # both go to the same peer and are matched in posting order: rank 0's gradient lands in
        # rank 1's activation buffer (same shape, no error; measured: wrong losses from the first
        # steady-state micro-batch). megatron's unbatched exchange keeps the two directions on
        # separate groups at PP=2, and overlaps them with compute: Megatron-LM's default with
        # virtual stages (--overlap-p2p-communication, batch_p2p_comm = not overlap).
        split.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if parallel.vision_stages > 1:
        # Stages without LM layers exist only in megatron's layout form. The tensor a stage
        # sends differs by stage (encoder activations before the encoder's last stage, the
        # LM's hidden states after), so the schedules exchange each tensor's shape first.
        # (megatron-core refuses variable lengths with its default MoE dispatcher even without
        # experts; there are none here, so naming another changes nothing else.)
        split = dict(pipeline_model_parallel_layout=megatron_layout(parallel.stage_layer_counts(lm.num_layers)),
                     variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        ffn_hidden_size=lm.ffn_hidden_size,
        kv_channels=lm.head_dim,
        layernorm_epsilon=lm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lm.add_qkv_bias,
        qk_layernorm=lm.qk_layernorm,  # also makes finalize_model_grads sum the q/k norm grads over TP
        init_method_std=lm.init_method_std,
        **split,
        **_common(parallel, params_dtype),
    )


def vision_transformer_config(model: ModelConfig, parallel: ParallelConfig,
                              params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    v = model.vision
    common = _common(parallel, params_dtype)
    common.update(pipeline_model_parallel_size=1, sequence_parallel=False)  # one stage, never chunked
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.padded_ffn_hidden_size,  # zero units up to ffn_pad_multiple (exact)
        layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=True,
        **common,
    )


def projector_transformer_config(lm_config: TransformerConfig,
                                 ffn_hidden_size: int | None = None) -> TransformerConfig:
    """MLP (merged patches -> LM width): GELU, biases, replicated input (no SP). Its width is
    ``model.vision.projector_width`` (the LM width by default; Qwen2.5-VL's merger: 4 * hv)."""
    return dataclasses.replace(
        lm_config,
        ffn_hidden_size=ffn_hidden_size or lm_config.hidden_size,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        num_layers_in_first_pipeline_stage=None,  # the LM's pipeline split; the projector is not split
        num_layers_in_last_pipeline_stage=None,
        pipeline_model_parallel_layout=None,
        virtual_pipeline_model_parallel_size=None,
    )

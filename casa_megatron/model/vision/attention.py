"""Core attention of the vision blocks: non-causal attention per image, frame or window.

It fills megatron's ``core_attention`` slot of a ``SelfAttention`` (so the block keeps
megatron's fused QKV, RoPE, output projection and tensor parallelism) and runs the segments
described by ``packed_seq_params.cu_seqlens_q`` through the window-attention interface
(``model/kernels``: torch on CPU, flash-attn / TE varlen on GPU). No dense mask over the
patches of a micro-batch is ever built: memory grows with the longest segment, not with the
number of images.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.model.kernels import window_attention


class VarlenVisionAttention(torch.nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int = 1, attn_mask_type=None,
                 attention_type: str = "self", softmax_scale: Optional[float] = None,
                 backend: str = "auto", **_unused):
        super().__init__()
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        # query/key/value [n, 1, heads(/tp), d] -> [n, 1, heads(/tp)*d]
        if packed_seq_params is None:
            raise ValueError("vision attention needs its segments (packed_seq_params with cu_seqlens)")
        if query.shape[1] != 1:
            raise ValueError(f"vision attention packs every patch in one sequence (batch 1), got {query.shape[1]}")
        n = query.shape[0]
        out = window_attention(
            query[:, 0], key[:, 0], value[:, 0],
            packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv,
            packed_seq_params.max_seqlen_q, packed_seq_params.max_seqlen_kv,
            causal_bottom_right=False, softmax_scale=self.softmax_scale, backend=self.backend,
        )  # [n, heads, d]
        return out.reshape(n, 1, -1)

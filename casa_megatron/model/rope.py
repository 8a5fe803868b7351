"""Rotary embeddings indexed by explicit position ids.

Packed sequences restart positions per sample, and image keys take the position of their
window start, so frequencies are looked up per token instead of per sequence index. The
rotation itself is megatron-core's (``apply_rotary_pos_emb``, rotate-half convention = HF).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class PositionRotary(torch.nn.Module):
    """Megatron's RotaryEmbedding, looked up at arbitrary position ids."""

    def __init__(self, config: TransformerConfig, kv_channels: int, rotary_base: float, scaling=None):
        """``scaling``: a RopeScalingConfig (HF ``rope_parameters``): ``linear`` divides positions
        by its factor (megatron's ``seq_len_interpolation_factor``); ``llama3`` rescales the
        frequencies with megatron's Llama 3.1 formula, given all four HF parameters (megatron's
        constructor would pass only the factor)."""
        super().__init__()
        kind = getattr(scaling, "type", "none")
        self.rotary = RotaryEmbedding(
            kv_channels=kv_channels,
            rotary_percent=1.0,
            rotary_base=rotary_base,
            seq_len_interpolation_factor=scaling.factor if kind == "linear" else None,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        if kind == "llama3":
            self.rotary.inv_freq = self.rotary._apply_scaling(
                self.rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings)

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids [...] -> freqs [..., 1, d] (one head axis to broadcast over)."""
        table = self.rotary(int(position_ids.max().item()) + 1)  # [P, 1, 1, d]
        return table[:, 0][position_ids.long()]  # [..., 1, d]

    def text_freqs(self, position_ids: Tensor) -> Tensor:
        """position_ids [b, s] -> freqs [s, b, 1, d], the layout megatron's SelfAttention takes."""
        return self.forward(position_ids).transpose(0, 1).contiguous()


def rotate(t: Tensor, freqs: Tensor, config: TransformerConfig) -> Tensor:
    """t [n, heads, d] or [s, b, heads, d]; freqs broadcastable with a heads axis of 1."""
    return apply_rotary_pos_emb(t, freqs, config)

"""RMSNorm for the local (non-TE) spec that works with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism because it does not tag its
weight: under SP each TP rank sees a different slice of the sequence, so norm-weight gradients
are partial and must be summed over the TP group. Tagging ``weight.sequence_parallel`` is what
megatron's ``finalize_model_grads`` looks for to do that all-reduce (TE norms do the same).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

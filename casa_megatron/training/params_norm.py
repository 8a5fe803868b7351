"""The L2 norm of the trained weights, for the log (``log_params_norm``, Megatron-LM's
``--log-params-norm``).

A slow drift or a jump of this norm shows a run going wrong before its loss does (too high a
learning rate, weight decay fighting the updates); between fusions it tells how far the new
weights move. Over the parameters that train (frozen weights would only add a constant), each
counted once: a weight that every tensor-parallel rank holds whole (norms, row-parallel biases)
on TP rank 0 only, the last pipeline stage's copy of tied embeddings not at all; then summed over
the model-parallel group (TP x PP). Data-parallel replicas hold the same weights. In float64, on
the model's own weights (bf16 in a bf16 run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


def params_norm(chunks) -> float:
    """Collective over the model-parallel group: every TP / PP rank must call it at the same step."""
    device = next(chunks[0].parameters()).device
    squares = torch.zeros(1, dtype=torch.float64, device=device)
    for chunk in chunks:
        for param in chunk.parameters():
            if not param.requires_grad or getattr(param, "shared", False):
                continue
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            squares += param.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return float(squares.sqrt())

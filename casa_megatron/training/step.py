"""One micro-batch forward for megatron's schedules, and gradient finalisation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from casa_megatron.model.batch import VLMBatch


def masked_mean(per_token: torch.Tensor, batch: VLMBatch) -> torch.Tensor:
    """Mean loss over answer tokens (loss_mask), the paper's objective."""
    mask = batch.loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def forward_step(data_iterator, model):
    """megatron ``forward_step_func``: returns the stage output and the loss function."""
    batch: VLMBatch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        loss = masked_mean(per_token, batch)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def finalize_grads(model: torch.nn.Module) -> None:
    """Sum sequence-parallel norm grads over TP and average grads over data-parallel ranks
    (what megatron's DDP + finalize_model_grads do; the distributed optimizer replaces this)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        for p in params:
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        for p in params:
            dist.all_reduce(p.grad, group=parallel_state.get_data_parallel_group())
            p.grad /= dp


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Global grad norm over the whole model-parallel group (TP shards counted once, replicated
    parameters once), then clip: the same norm at any TP/PP layout."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads_for_norm = [p.grad for p in params if param_is_not_tensor_parallel_duplicate(p)]
    total = get_grad_norm_fp32(grads_for_norm, norm_type=2,
                               grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    scale = max_norm / (total + 1e-6)
    if max_norm > 0 and scale < 1.0:  # megatron's clip_grad_by_total_norm_fp32 asserts CUDA tensors
        torch._foreach_mul_([p.grad for p in params], scale)
    return float(total)

"""One micro-batch forward for megatron's schedules (batch -> stage output, loss function)."""

from __future__ import annotations

import torch

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

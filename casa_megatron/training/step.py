"""One micro-batch forward for megatron's schedules (batch -> stage output, loss function)."""

from __future__ import annotations

import torch

from casa_megatron.model.batch import VLMBatch


def masked_mean(per_token: torch.Tensor, batch: VLMBatch) -> torch.Tensor:
    """Mean loss over answer tokens (loss_mask), the paper's objective."""
    mask = batch.loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def forward_step(data_iterator, model):
    """megatron ``forward_step_func``: returns the stage output and the loss function.

    The loss function hands megatron the micro-batch's summed answer loss and its number of
    answer tokens. megatron then either divides by that count and by the number of
    micro-batches (the default: a mean of per-micro-batch means) or, with
    ``calculate_per_token_loss``, sums over micro-batches and divides the gradients by the
    global batch's answer tokens (every token weighs the same, however samples were packed)."""
    batch: VLMBatch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        mask = batch.loss_mask.to(per_token.dtype)
        total = (per_token * mask).sum()
        tokens = batch.loss_mask.sum().round().to(torch.int)
        logged = {"loss_sum": total.detach().clone(), "tokens": tokens.detach().clone(),  # the schedule
                  "loss": (total / tokens.clamp(min=1)).detach()}  # divides `total` in place
        return total, tokens, logged

    return output, loss_func

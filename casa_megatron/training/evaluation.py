"""Validation loss on ``data.valid``: forward only, under the training's own parallel layout.

Every ``eval_interval`` steps (and at the last step) the model runs megatron's schedule with
``forward_only=True`` over ``eval_iters`` global batches read from the start of the validation
sources (same samples every time, no shuffling), in eval mode and without autograd. The loss is
the token-weighted mean over every answer token of those batches, summed over micro-batches and
data-parallel ranks (not a mean of per-batch means), so it does not depend on how the samples
were split across ranks and micro-batches. Tensor- and pipeline-parallel ranks compute it as in
training; the last pipeline stage holds the value.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from casa_megatron.data import make_eval_iterator
from casa_megatron.model.batch import VLMBatch


def eval_forward_step(data_iterator, model):
    """megatron ``forward_step_func`` for evaluation: the loss's sum and token count per micro-batch."""
    batch: VLMBatch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        mask = batch.loss_mask.to(per_token.dtype)
        total, tokens = (per_token * mask).sum(), mask.sum()
        return total / tokens.clamp(min=1.0), {"loss_sum": total.detach().clone(), "tokens": tokens.detach()}

    return output, loss_func


def evaluate(model, cfg, num_microbatches: int, data_cfg=None) -> Optional[float]:
    """Validation loss of ``model`` (the DDP-wrapped module); None off the last pipeline stage.

    ``data_cfg``: the data config the training iterator was built with, if the loop adjusted
    ``cfg.data`` (default ``cfg.data``)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = make_eval_iterator(data_cfg or cfg.data, cfg.micro_batch_size, dp_rank, dp_size, cfg.data.seed,
                              fusion=cfg.model.fusion.mechanism)
    forward_backward = get_forward_backward_func()
    sums = torch.zeros(2, dtype=torch.float64)
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(cfg.eval_iters):
                out = forward_backward(forward_step_func=eval_forward_step, data_iterator=data, model=[model],
                                       num_microbatches=num_microbatches,
                                       seq_length=cfg.data.seq_length + cfg.data.image_seq_length,
                                       micro_batch_size=cfg.micro_batch_size, forward_only=True)
                for d in out or []:
                    sums += torch.stack([d["loss_sum"].double(), d["tokens"].double()]).cpu()
    finally:
        model.train()
        data.close()
    if not parallel_state.is_pipeline_last_stage():
        return None
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return float(sums[0] / sums[1].clamp(min=1.0))

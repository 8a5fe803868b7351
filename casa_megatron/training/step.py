"""One micro-batch forward for megatron's schedules (batch -> stage output, loss function)."""

from __future__ import annotations

from collections import deque
from typing import Deque, Iterator, List, Union

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


class _SharedFeed:
    """One source read by several model chunks: chunk ``i``'s ``k``-th batch is the source's
    ``k``-th. Batches are kept until every chunk has taken them (the interleaved schedule runs
    up to a step's micro-batches through chunk 0 before chunk 1 sees the first)."""

    def __init__(self, source: Iterator, chunks: int):
        self.source = source
        self.kept: Deque = deque()
        self.first = 0  # index of kept[0]
        self.taken = [0] * chunks

    def take(self, chunk: int):
        index = self.taken[chunk]
        while index - self.first >= len(self.kept):
            self.kept.append(next(self.source))
        batch = self.kept[index - self.first]
        self.taken[chunk] += 1
        while self.kept and min(self.taken) > self.first:
            self.kept.popleft()
            self.first += 1
        return batch


class _ChunkFeed:
    def __init__(self, shared: _SharedFeed, chunk: int):
        self.shared, self.chunk = shared, chunk

    def __iter__(self):
        return self

    def __next__(self):
        return self.shared.take(self.chunk)


def data_for_chunks(source: Iterator, chunks: int) -> Union[Iterator, List[Iterator]]:
    """``data_iterator`` for megatron's schedules: ``source`` itself for one model chunk, else one
    iterator per chunk over the same micro-batches. Every chunk needs the whole micro-batch
    (windows, positions, labels on the last), as every pipeline stage does (``forward_step``)."""
    if chunks == 1:
        return source
    shared = _SharedFeed(source, chunks)
    return [_ChunkFeed(shared, i) for i in range(chunks)]

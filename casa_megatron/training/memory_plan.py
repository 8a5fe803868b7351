"""Bytes each GPU holds for weights, gradients and optimizer state, before any activation.

Why: whether a recipe fits is known only on the GPUs, and a lent GPU session is short. What the
weights cost per rank follows from the parameter counts and the layout, as Megatron-LM's
``report_theoretical_memory`` reports it; ``tools/describe_model.py`` prints it per pipeline stage.

Per parameter on a rank (TP-split parameters count ``numel / TP``, replicated ones in full):

* the parameter itself: 2 bytes in bf16, 4 in fp32 (frozen parameters hold nothing else);
* its gradient: 4 bytes, megatron DDP's fp32 gradient buffer (``grad_reduce_in_fp32``);
* its optimizer state: Adam's two moments (8 bytes), plus an fp32 main copy (4 bytes) when the
  parameters are bf16; divided by the data-parallel size with the distributed optimizer, which
  keeps one shard of each per DP rank.

Activations come on top and depend on the rows (the step log's ``peak_memory_gib`` measures
them). Megatron pads each gradient bucket to a multiple of the DP size (a few hundred elements
per bucket, not counted here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

GIB = 2 ** 30


@dataclass(frozen=True)
class WeightMemory:
    params: int  # bytes of this rank's parameters
    grads: int  # fp32 gradient buffers of its trainable parameters
    optimizer: int  # Adam moments (+ fp32 main copies in bf16), this rank's share

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def gib(self) -> Tuple[float, float, float, float]:
        return self.params / GIB, self.grads / GIB, self.optimizer / GIB, self.total / GIB


def parameter_shapes(named_parameters) -> Iterable[Tuple[str, int, bool, bool]]:
    """(name, numel, trainable, split over TP) of ``(name, parameter)`` pairs, e.g. a model's
    ``named_parameters()`` (megatron tags the column- and row-parallel weights
    ``tensor_model_parallel`` whatever the TP size)."""
    for name, p in named_parameters:
        yield name, p.numel(), p.requires_grad, bool(getattr(p, "tensor_model_parallel", False))


def weight_memory(params: Iterable[Tuple[str, int, bool, bool]], tp: int = 1, dp: int = 1, bf16: bool = True,
                  distributed_optimizer: bool = True) -> WeightMemory:
    """Bytes per rank for ``params`` (one pipeline stage's ``parameter_shapes``) at TP ``tp``
    and DP ``dp``."""
    held = trained = 0.0
    for _, numel, trainable, split in params:
        local = numel / tp if split else numel
        held += local
        trained += local if trainable else 0
    state_per_param = 8 + (4 if bf16 else 0)
    shards = dp if distributed_optimizer else 1
    return WeightMemory(params=round(held * (2 if bf16 else 4)), grads=round(trained * 4),
                        optimizer=round(trained * state_per_param / shards))

"""Activation recomputation of a stage's decoder layers (``model.recompute``): whole chunks of
layers (``full``, :func:`run_layers`) or chosen modules of every layer (``selective``,
:func:`recompute_modules`).

megatron's TransformerBlock recomputes inside its own layer loop; our stages run their own loops
(CASA layers also take image states and windows: ``decoder.py``, and insertion's combined
stream), so the chunking lives here and both loops call :func:`run_layers`.

torch's non-reentrant checkpoint, not megatron's ``tensor_parallel.checkpoint``: megatron's is a
reentrant autograd Function whose backward only runs when one of its tensor inputs requires
grad. With a frozen LM (``model.freeze_lm``: only CASA layers and the projector train) the first
layers' input is the frozen embedding and a text-only micro-batch has no image states, so the
chunk's trainable CASA weights would silently get no gradient. The non-reentrant form records the
graph through the parameters themselves and has no such hole. Collectives inside a chunk (tensor
parallelism, sequence parallelism's gathers) run again during the recompute, in the same order
on every rank, as in megatron. Dropout is off throughout this framework (``transformer_config.py``)
so no model-parallel RNG state needs replaying; :func:`run_layers` refuses a config with dropout
rather than recompute it with a different mask.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from casa_megatron.config.schema import RecomputeConfig

NO_RECOMPUTE = RecomputeConfig()


def chunks(num_layers: int, recompute: RecomputeConfig) -> List[Tuple[int, int, bool]]:
    """The stage's layers ``[0, num_layers)`` as consecutive ``(start, end, recomputed)`` runs.

    ``uniform``: chunks of ``recompute.num_layers`` layers, all recomputed (the last may be
    shorter). ``block``: the first ``recompute.num_layers`` layers, one chunk each, recomputed;
    the rest of the stage in one chunk that keeps its activations."""
    if num_layers == 0:
        return []
    if not recompute.full:  # none, or selective: whole layers are never recomputed
        return [(0, num_layers, False)]
    n = recompute.num_layers
    if recompute.method == "uniform":
        return [(start, min(start + n, num_layers), True) for start in range(0, num_layers, n)]
    k = min(n, num_layers)
    return [(i, i + 1, True) for i in range(k)] + ([(k, num_layers, False)] if k < num_layers else [])


def _refuse_dropout(config) -> None:
    """A recomputed forward would draw another dropout mask: refused rather than computed wrong
    (``config``: the layers' TransformerConfig)."""
    dropout = max(config.hidden_dropout, config.attention_dropout)
    if dropout > 0:
        raise ValueError(f"activation recomputation with dropout {dropout} would draw a different mask in "
                         "the recomputed forward; this framework trains without dropout")


def run_layers(layers: Sequence[torch.nn.Module], hidden: Tensor, call: Callable[..., Tensor],
               recompute: RecomputeConfig, config) -> Tensor:
    """``hidden = call(layer, hidden)`` for each layer in order; in a recomputed chunk only the
    chunk's input is kept for backward and its layers run again there. ``config``: the layers'
    TransformerConfig (its dropout rates).

    ``call`` closes over everything else a layer reads (image states, windows, masks, rotary
    tables): the checkpoint records gradients into closed-over tensors too, so the image states'
    gradient still reaches the projector and the vision encoder."""
    if recompute.enabled:
        _refuse_dropout(config)
    for start, end, recomputed in chunks(len(layers), recompute):
        def run(h: Tensor, start: int = start, end: int = end) -> Tensor:
            for layer in layers[start:end]:
                h = call(layer, h)
            return h

        if recomputed and torch.is_grad_enabled():
            hidden = checkpoint(run, hidden, use_reentrant=False)
        else:
            hidden = run(hidden)
    return hidden


# RecomputeConfig.modules -> the attribute naming that module in every layer (megatron's
# TransformerLayer and our CASA layer alike: self_attention.core_attention, casa_attention.core_attention, mlp)
SELECTIVE_MODULES = {"core_attn": "core_attention", "mlp": "mlp"}


class _Recomputed:
    """A module's forward that keeps only its inputs for backward (torch's non-reentrant
    checkpoint, for the reason in the module docstring) while training with gradients."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.forward = module, module.forward

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def recompute_modules(layers: Sequence[torch.nn.Module], recompute: RecomputeConfig, config) -> int:
    """Selective recomputation (Megatron-LM's ``--recompute-granularity selective``): every
    submodule of ``layers`` that ``recompute.modules`` names is recomputed in backward (its
    ``forward`` replaced on the instance: parameters, state-dict keys and hooks unchanged).
    Returns how many modules were wrapped; nothing without ``selective``."""
    if not recompute.selective:
        return 0
    _refuse_dropout(config)
    names = {SELECTIVE_MODULES[m] for m in recompute.modules}
    wrapped = 0
    for layer in layers:
        for name, module in layer.named_modules():
            if name.rpartition(".")[2] in names and not isinstance(module.forward, _Recomputed):
                module.forward = _Recomputed(module)
                wrapped += 1
    return wrapped

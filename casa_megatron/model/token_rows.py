"""Embedding rows that train while the LM is frozen (``model.trainable_tokens``).

A base LM's tokenizer may lack the tokens a recipe needs; ``import-hf --add-tokens`` gives them
rows at the mean of the known ones. With ``model.freeze_lm`` those rows would stay there: fine
for a marker the model only reads (``<image>``), not for a token it must learn to produce (an
end-of-turn ``<eot>``: its output row decides when generation stops). LLaVA unfreezes the input
embeddings for its added tokens; PEFT has ``trainable_token_indices``. Here the listed ids train
and every other row stays bit for bit what it was:

* the word-embedding weight (and the output layer's, when it is not tied) is made trainable and
  tagged with this rank's rows of the listed ids (``ROW_MASK``: a bool ``[rows here]`` mask;
  vocab-parallel ranks hold rows ``[start, start + rows)`` of the padded vocabulary);
* after megatron's gradient finalisation (data-parallel reduction, the tied embedding's
  first/last-stage all-reduce), ``zero_frozen_rows`` zeroes every other row's gradient. Doing it
  there, on ``main_grad``, holds whatever wrote the gradient: a per-parameter hook would miss
  Transformer Engine's and megatron's fused weight-gradient accumulation, which write
  ``main_grad`` directly on a GPU;
* these weights train at ``lr_new`` (they are new rows) and without weight decay
  (``training/optimizer.py``): AdamW's decay would shrink the frozen rows, and Adam moves a
  parameter whose gradient was always zero by exactly nothing.

The cost is that of a trainable embedding: its fp32 gradient and Adam state over every row
(PEFT's delta rows would hold less, at the price of a copy of the weight in every forward), and
the output layer's weight-gradient GEMM.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple

import torch
from megatron.core import parallel_state

ROW_MASK = "trainable_row_mask"  # bool [rows on this rank]: the rows whose gradient is kept
TOKEN_ROWS = "token_rows_only"  # True on such weights: read by the optimizer's param groups


def _vocab_weights(model) -> Iterator[Tuple[torch.nn.Parameter, int]]:
    """(weight, first padded-vocabulary row it holds) of each vocabulary table on this rank."""
    if model.pre_process:
        table = model.embedding.word_embeddings
        yield table.weight, table.vocab_start_index
    output = getattr(model, "output_layer", None)
    if model.post_process and output is not None and output.weight is not None:
        # untied, or the last stage's copy of a tied embedding under PP (its gradient is summed
        # with the first stage's by finalize_model_grads)
        rows = output.weight.shape[0]
        yield output.weight, parallel_state.get_tensor_model_parallel_rank() * rows


def enable_token_rows(model, token_ids: Iterable[int]) -> List[torch.nn.Parameter]:
    """Make the vocabulary tables of ``model`` (a VLM chunk) trainable in the rows of
    ``token_ids`` only; returns the weights tagged."""
    ids = sorted(set(int(t) for t in token_ids))
    tagged = []
    for weight, start in _vocab_weights(model):
        rows = weight.shape[0]
        mask = torch.zeros(rows, dtype=torch.bool, device=weight.device)
        local = [t - start for t in ids if start <= t < start + rows]
        mask[local] = True
        weight.requires_grad_(True)
        setattr(weight, ROW_MASK, mask)
        setattr(weight, TOKEN_ROWS, True)
        weight.casa_new = True  # new rows: lr_new
        tagged.append(weight)
    return tagged


@torch.no_grad()
def zero_frozen_rows(chunks) -> None:
    """Zero the gradient of every row outside ``model.trainable_tokens`` (after finalisation)."""
    for chunk in chunks:
        for param in chunk.parameters():
            mask = getattr(param, ROW_MASK, None)
            if mask is None or not param.requires_grad:
                continue
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grad[~mask] = 0

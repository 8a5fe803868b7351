"""Validation loss on ``data.valid``: forward only, under the training's own parallel layout.

Every ``eval_interval`` steps (and at the last step) the model runs megatron's schedule with
``forward_only=True`` over ``eval_iters`` global batches read from the start of the validation
sources (same samples every time, no shuffling), in eval mode and without autograd. The loss is
the token-weighted mean over every answer token of those batches, summed over micro-batches and
data-parallel ranks (not a mean of per-batch means), so it does not depend on how the samples
were split across ranks and micro-batches. Tensor- and pipeline-parallel ranks compute it as in
training; the last pipeline stage holds the value. With several validation sources (e.g. one per
task) each is also reported on its own (``valid_loss/<name>``).
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from casa_megatron.config.errors import ConfigError
from casa_megatron.data import make_eval_iterator
from casa_megatron.training.step import data_for_chunks, forward_step  # its logged sums: loss_sum, tokens


def source_names(entries) -> List[str]:
    """Metric names of ``data.valid`` entries: the path's last part without its extension
    (``.../docvqa_val.jsonl`` -> ``docvqa_val``), numbered when two would collide."""
    from casa_megatron.data.sources import SourceSpec

    names: List[str] = []
    for i, entry in enumerate(entries):
        path = PurePath(SourceSpec.parse(entry, f"data.valid[{i}]").path.rstrip("/"))
        base = path.name.split(".")[0] or f"valid{i}"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _score(model, cfg, num_microbatches: int, data_cfg) -> torch.Tensor:
    """[answer-loss sum, answer tokens] of ``eval_iters`` global batches of ``data_cfg.valid``
    on this rank (float64)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = make_eval_iterator(data_cfg, cfg.micro_batch_size, dp_rank, dp_size, cfg.data.seed,
                              fusion=cfg.model.fusion.mechanism)
    forward_backward = get_forward_backward_func()
    sums = torch.zeros(2, dtype=torch.float64)
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(cfg.eval_iters):
                out = forward_backward(forward_step_func=forward_step, data_iterator=data_for_chunks(data, len(model)),
                                       model=model.chunks,
                                       num_microbatches=num_microbatches,
                                       seq_length=cfg.data.seq_length + cfg.data.image_seq_length,
                                       micro_batch_size=cfg.micro_batch_size, forward_only=True)
                for d in out or []:
                    sums += torch.stack([d["loss_sum"].double(), d["tokens"].double()]).cpu()
    finally:
        model.train()
        data.close()
    return sums


def _parts(data_cfg) -> List:
    """The data configs scored separately: one per ``data.valid`` source when there are several."""
    if len(data_cfg.valid) > 1 and not data_cfg.is_synthetic:
        return [dataclasses.replace(data_cfg, valid=[entry]) for entry in data_cfg.valid]
    return [data_cfg]


def check_validation(cfg, data_cfg) -> None:
    """Open every validation stream once before training, so that a source this layout cannot
    read (e.g. fewer samples than data-parallel ranks, a shard that does not open) stops the run
    at start instead of at its first evaluation, ``eval_interval`` steps later."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    parts = _parts(data_cfg)
    names = source_names(data_cfg.valid) if len(parts) > 1 else ["data.valid"]
    for name, part in zip(names, parts):
        try:
            make_eval_iterator(part, cfg.micro_batch_size, dp_rank, dp_size, cfg.data.seed,
                               fusion=cfg.model.fusion.mechanism).close()
        except (ValueError, OSError) as exc:
            when = "skip_train=true cannot score it" if cfg.skip_train else \
                f"the first evaluation (step {cfg.eval_interval}) would fail"
            raise ConfigError(f"validation source {name} ({', '.join(str(v) for v in part.valid)}) cannot be "
                              f"read at dp_size={dp_size}: {exc}; {when}") from exc


def evaluate(model, cfg, num_microbatches: int, data_cfg=None) -> Optional[Dict[str, float]]:
    """Validation losses of ``model`` (the DDP-wrapped model chunks); None off the last pipeline stage.

    ``{"valid_loss": ...}``; with several ``data.valid`` sources each is scored on its own
    ``eval_iters`` global batches and reported as ``valid_loss/<name>`` (``source_names``), and
    ``valid_loss`` is the token-weighted mean over all of them. ``data_cfg``: the data config the
    training iterator was built with, if the loop adjusted ``cfg.data`` (default ``cfg.data``)."""
    data_cfg = data_cfg or cfg.data
    parts = _parts(data_cfg)
    per_source = len(parts) > 1
    sums = torch.stack([_score(model, cfg, num_microbatches, part) for part in parts])  # [n, 2]
    if not parallel_state.is_pipeline_last_stage():
        return None
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    total = sums.sum(0)
    scores = {"valid_loss": float(total[0] / total[1].clamp(min=1.0))}
    if per_source:
        for name, (loss, tokens) in zip(source_names(data_cfg.valid), sums):
            scores[f"valid_loss/{name}"] = float(loss / tokens.clamp(min=1.0))
    return scores

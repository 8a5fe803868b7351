"""Held-out items read by data-parallel replicas, each its own share of the samples.

Every replica used to read and decode the whole held-out set and keep it (the evaluation during
training keeps it for the whole run): at DP = 64, 64 times the decoding at start-up and the
memory, for items each replica then mostly did not answer. A replica now reads every DP-th sample
(``read_items(part=(dp_rank, dp))``), answers those, and ``answering.run_replicas`` merges the
answers back in the samples' order.

Reading is then collective over the data-parallel group: a sample that fails to read (a
misspelt metric, a broken annotation) is in one share only, so the replicas exchange what they
read (their counts, skipped reasons, or the error) and every rank stops with the same error
instead of the others waiting for it in the evaluation's first collective.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch.distributed as dist

from casa_megatron.data.recipe import RecipeError
from casa_megatron.data.records import ShardError
from casa_megatron.evaluation.answer_metrics import MetricError
from casa_megatron.evaluation.items import Items, read_items


class HeldOutError(ValueError):
    """A replica could not read its share of the held-out samples (the message says why)."""


@dataclass
class HeldOut:
    """This replica's items and the counts of the whole set (every share)."""

    items: Items
    questions: int = 0
    captions: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> count, over every share

    @property
    def empty(self) -> bool:
        return not self.questions and not self.captions


def replica_share() -> Tuple[int, int]:
    """(this rank's data-parallel rank, the data-parallel size); (0, 1) before megatron's groups."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _gathered(mine) -> List:
    from megatron.core import parallel_state

    out = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(out, mine, group=parallel_state.get_data_parallel_group())
    return out


def read_held_out(path: str, settings, max_samples=None, media_root: str = "",
                  part: Tuple[int, int] = (0, 1)) -> HeldOut:
    """``read_items`` of share ``part``. A share (``part[1] > 1``, the data-parallel size) is
    collective over the data-parallel group and raises ``HeldOutError`` on every rank when any
    replica failed; the whole set (``(0, 1)``) is read alone, its errors raised as they are."""
    if part == (0, 1):
        items = read_items(path, settings, max_samples, media_root)
        return HeldOut(items, len(items.questions), len(items.captions), dict(items.skipped))
    items, problem = None, None
    try:
        items = read_items(path, settings, max_samples, media_root, part=part)
    except (OSError, ValueError, ShardError, RecipeError, MetricError) as exc:
        problem = f"{exc}"
    shares = _gathered(problem or (len(items.questions), len(items.captions), items.skipped))
    problems = [p for p in shares if isinstance(p, str)]
    if problems:
        raise HeldOutError(problems[0])
    return HeldOut(items, sum(q for q, _, _ in shares), sum(c for _, c, _ in shares),
                   dict(sum((Counter(skipped) for _, _, skipped in shares), Counter())))

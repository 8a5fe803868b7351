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


def gathered_over_replicas(mine) -> List:
    """``mine`` from every data-parallel replica, in replica order (``[mine]`` without replicas)."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return [mine]
    out = [None] * dp
    dist.all_gather_object(out, mine, group=parallel_state.get_data_parallel_group())
    return out


def read_held_out(path: str, settings, max_samples=None, media_root: str = "",
                  share: Tuple[int, int] = (0, 1), whole: bool = False) -> HeldOut:
    """This replica's held-out items: share ``share = (dp rank, dp)`` of the samples, or all of them
    where ``whole`` (``casa-eval``'s rank 0, which also answers them all through the HF side;
    ``answering.run_replicas`` takes its share from them). With ``dp > 1`` collective over the
    data-parallel group: the counts are the whole set's, and an error on any replica raises
    ``HeldOutError`` on every rank. With ``dp == 1`` the whole set, its errors raised as they are."""
    rank, dp = share
    if dp == 1:
        items = read_items(path, settings, max_samples, media_root)
        return HeldOut(items, len(items.questions), len(items.captions), dict(items.skipped))
    items, problem = None, None
    try:
        items = read_items(path, settings, max_samples, media_root, part=(0, 1) if whole else share)
    except (OSError, ValueError, ShardError, RecipeError, MetricError) as exc:
        problem = str(exc) or type(exc).__name__
    if problem is None:  # counted over this replica's share only; a whole reader's skips are the set's
        mine = (sum(q.order % dp == rank for q in items.questions), sum(c.order % dp == rank for c in items.captions),
                items.skipped, whole)
    shares = gathered_over_replicas(problem or mine)
    problems = [p for p in shares if isinstance(p, str)]
    if problems:
        raise HeldOutError(problems[0])
    complete = [skipped for _, _, skipped, was_whole in shares if was_whole]
    skipped = complete[0] if complete else dict(sum((Counter(k) for _, _, k, _ in shares), Counter()))
    return HeldOut(items, sum(s[0] for s in shares), sum(s[1] for s in shares), dict(skipped))

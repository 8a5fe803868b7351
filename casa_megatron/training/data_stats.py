"""Totals of the data loader across data-parallel ranks: samples read and skipped, by reason.

A skipped sample used to be one log line and nothing else; over a long run nobody can tell
whether 3 or 30 % of the data was unusable. The loop logs these totals every ``log_interval``
steps (a warning when new skips appeared) and at the end, and tracks them as metrics
(``data_samples_seen``, ``data_samples_skipped``, ``data_skipped/<reason>``) in
``metrics.jsonl`` and MLflow.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict

import torch.distributed as dist
from megatron.core import parallel_state


def skip_totals(data) -> Dict:
    """Collective over the data-parallel group: {"seen", "skipped", "by_reason"} summed over DP ranks."""
    stats = data.stats()
    local = {"seen": int(stats["samples_seen"]), "skipped": int(stats["samples_skipped"]),
             "by_reason": dict(stats.get("skipped_by_reason", {}))}
    group = parallel_state.get_data_parallel_group()
    size = parallel_state.get_data_parallel_world_size()
    parts = [local]
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, local, group=group)
    by_reason: Counter = Counter()
    for part in parts:
        by_reason.update(part["by_reason"])
    return {"seen": sum(p["seen"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
            "by_reason": dict(sorted(by_reason.items()))}


def skip_metrics(totals: Dict) -> Dict[str, float]:
    return {"data_samples_seen": totals["seen"], "data_samples_skipped": totals["skipped"],
            **{f"data_skipped/{reason}": n for reason, n in totals["by_reason"].items()}}


def describe(totals: Dict) -> str:
    reasons = ", ".join(f"{reason}: {n}" for reason, n in totals["by_reason"].items())
    share = totals["skipped"] / totals["seen"] if totals["seen"] else 0.0
    return (f"{totals['seen']} samples read, {totals['skipped']} skipped ({100 * share:.1f}%)"
            + (f" [{reasons}]" if reasons else ""))

"""Carry the data position over a change of the data-parallel size (more or fewer GPUs on resume).

Each rank reads its own share of every source's epoch order: rank ``r`` of ``W`` takes global
positions ``r, r + W, r + 2W, ...`` of the epoch's permutation (``sampler.RankOrder``), and its
saved position is a draw count per source plus the samples waiting in its packing buffer. The
permutation depends only on the seed, the epoch and the source, not on ``W``; so a draw of any
layout has a global index ``epoch * N + position``, and the saved states of all old ranks say
exactly which global indices were used.

Resharding continues every source at its **watermark**: the smallest global index that some old
rank had not used yet (the first draw it had not consumed, or a sample still waiting in its
buffer). Everything below the watermark was used, so no sample is lost; what old ranks had used
above it (they run a few samples apart, since packing takes variable-length samples) is read
once more, and counted. Megatron-LM does the same with its single ``consumed_samples`` counter.
The blend's choice of source is a function of the draw counts, so it continues too.

Per-rank statistics (samples seen, skipped by reason, the first skipped keys) are summed into
the new rank 0, so run totals continue; packing statistics start afresh.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence

from casa_megatron.data.sampler import rank_share


@dataclass
class Resharded:
    state: Dict  # this rank's loader state under the new layout (``TrainIterator.load_state_dict``)
    watermarks: List[int]  # per source: the global index the new layout continues from
    reread: int  # samples old ranks had used at or above the watermarks (read once more)


def global_index(draw: int, rank: int, world: int, size: int) -> int:
    """The global index (epoch * size + position in the epoch's order) of a rank's ``draw``."""
    epoch, i = divmod(draw, rank_share(size, rank, world))
    return epoch * size + rank + i * world


def draws_below(index: int, rank: int, world: int, size: int) -> int:
    """How many of a rank's draws have a global index below ``index``."""
    epoch, position = divmod(index, size)
    return epoch * rank_share(size, rank, world) + rank_share(position, rank, world)


def _check(states: Sequence[Dict]) -> int:
    if not states:
        raise ValueError("no data states to reshard")
    kinds = {s.get("kind") for s in states}
    if kinds != {"shards"}:
        raise ValueError(f"only the shard loader's position can be resharded (got {sorted(map(str, kinds))})")
    world = int(states[0]["dp_size"])
    ranks = sorted(int(s["dp_rank"]) for s in states)
    if ranks != list(range(world)) or any(int(s["dp_size"]) != world for s in states):
        raise ValueError(f"data states of dp ranks {ranks} do not make up a layout of dp_size={world}")
    from casa_megatron.data.loader import STATE_VERSION

    if any(s.get("version") != STATE_VERSION for s in states):
        raise ValueError(f"data states of version {sorted({str(s.get('version')) for s in states})} cannot be "
                         f"resharded (only version {STATE_VERSION})")
    if any((s["seed"], s["sources"], s.get("order")) != (states[0]["seed"], states[0]["sources"], states[0].get("order"))
           for s in states):
        raise ValueError("the saved data states disagree on the seed, the sources or the order")
    return world


def reshard_position(states: Sequence[Dict], dp_rank: int, dp_size: int) -> Resharded:
    """``states``: the saved loader states of every old data-parallel rank (any order). Returns
    rank ``dp_rank``'s state for ``dp_size`` ranks."""
    world = _check(states)
    states = sorted(states, key=lambda s: int(s["dp_rank"]))
    sizes = [int(src["num_samples"]) for src in states[0]["sources"]]
    if min(sizes) < dp_size:
        raise ValueError(f"a source has {min(sizes)} samples, fewer than dp_size={dp_size} ranks")
    watermarks, reread = [], 0
    for s, size in enumerate(sizes):
        unused = []  # per old rank: its first draw of source s not used yet
        for r, state in enumerate(states):
            waiting = [int(d) for src, d in state["buffer"] if int(src) == s]
            unused.append(min([int(state["counts"][s])] + waiting))
        mark = min(global_index(d, r, world, size) for r, d in enumerate(unused))
        watermarks.append(mark)
        for r, state in enumerate(states):  # used draws at or above the watermark
            waiting = {int(d) for src, d in state["buffer"] if int(src) == s}
            first = draws_below(mark, r, world, size)
            reread += sum(1 for d in range(first, int(state["counts"][s])) if d not in waiting)
    counts = [draws_below(mark, dp_rank, dp_size, size) for mark, size in zip(watermarks, sizes)]
    counters, skips, keys = Counter(), Counter(), {}
    if dp_rank == 0:
        for state in states:
            counters.update({k: v for k, v in state["counters"].items() if k in ("seen", "skipped")})
            counters["epochs_done"] = max(counters["epochs_done"], state["counters"].get("epochs_done", 0))
            skips.update(state["skipped_by_reason"])
            for reason, names in state.get("skipped_keys", {}).items():
                keys.setdefault(reason, []).extend(names[:5 - len(keys.get(reason, []))])
    state = {"version": states[0]["version"], "kind": "shards", "seed": states[0]["seed"], "dp_rank": dp_rank,
             "dp_size": dp_size, "sources": states[0]["sources"], "counts": counts, "buffer": [],
             # mid-epoch: the epoch already had usable samples (the check that none had waits for the next)
             "good_in_epoch": [int(c % rank_share(n, dp_rank, dp_size) > 0) for c, n in zip(counts, sizes)],
             "counters": dict(counters), "skipped_by_reason": dict(skips), "skipped_keys": keys,
             "pack_stats": {}}
    if "order" in states[0]:  # data.order: stateless (a position means the same sample at any dp_size)
        state["order"] = states[0]["order"]
    return Resharded(state, watermarks, reread)

"""A weighted, deterministic mix of several sources for one data-parallel rank.

Every source keeps its own epoch order (``sampler.RankOrder``: seeded permutation, DP-sharded
at the sample level), and the stream draws from them by Megatron's blending rule: the next
draw goes to the source that is furthest behind its share, ``argmax_s  w_s * (N + 1) - n_s``
(``N`` draws so far, ``n_s`` of them from source s; ties to the lower index). After any
prefix every source is within one sample of ``w_s * N``, so proportions hold exactly, not in
expectation, and the choice is a pure function of the draw counts. The counts are therefore
the whole position of the stream: a resumed run that restores them draws the same samples in
the same order. A source smaller than its share simply runs through more epochs
(upsampling); every rank makes the same choices, so ranks stay in step.
"""

from __future__ import annotations

from typing import List, Sequence

from casa_megatron.data.sampler import RankOrder


class BlendOrder:
    def __init__(self, sizes: Sequence[int], weights: Sequence[float], rank: int, world: int, seed: int,
                 shuffle: bool = True, order: str = "permutation"):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source, at least one source")
        if min(weights) <= 0:
            raise ValueError(f"source weights must be > 0, got {list(weights)}")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.orders = [RankOrder(n, rank, world, seed, shuffle, salt=None if s == 0 else s, order=order)
                       for s, n in enumerate(sizes)]

    def __len__(self) -> int:
        return len(self.orders)

    def next_source(self, counts: Sequence[int]) -> int:
        """The source of the next draw after ``counts[s]`` draws from each source."""
        n = sum(counts) + 1
        errors = [w * n - c for w, c in zip(self.weights, counts)]
        return max(range(len(errors)), key=lambda s: (errors[s], -s))

    def epoch_length(self, source: int) -> int:
        return self.orders[source].epoch_length()

    def locate(self, source: int, draw: int) -> tuple:
        """(epoch, position in that epoch) of a source's ``draw``-th sample on this rank."""
        return divmod(draw, self.epoch_length(source))

    def sample_index(self, source: int, draw: int) -> int:
        return self.orders[source].sample_at(*self.locate(source, draw))

    def draws(self, counts: List[int], k: int) -> List[tuple]:
        """The next ``k`` (source, draw) pairs after ``counts`` (which is advanced in place)."""
        out = []
        for _ in range(k):
            s = self.next_source(counts)
            out.append((s, counts[s]))
            counts[s] += 1
        return out

"""A seeded permutation of ``0..n-1`` computed one index at a time: an epoch's order with no array.

Why: ``sampler.RankOrder`` draws each epoch's order whole (numpy's shuffle: 4 bytes per sample
while drawn, and the time to draw it at every epoch boundary, on every rank). At a billion
samples that is 4 GB and tens of seconds per rank per epoch. ``data.order: stateless`` instead
maps position ``p`` of epoch ``e`` to its sample through a keyed bijection, as Grain's
``index_shuffle`` does: a balanced Feistel network over the ``2^(2h)`` values of ``2h`` bits (the
smallest such domain >= n, so fewer than 4n values), made a bijection of ``0..n-1`` by cycle
walking (a value >= n is permuted again until it falls inside; each value's walk ends because
the network is a bijection of the domain). Six rounds whose round function is the splitmix64
finaliser of the half and a round key; the keys come from ``(seed, epoch, salt)`` through
numpy's seed sequence. It is not numpy's order: a run chooses one of the two and keeps it
(the loader's saved position names it).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

ROUNDS = 6
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit value whose every bit depends on every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class IndexShuffle:
    """A bijection of ``0..n-1`` keyed by ``key`` (any sequence of non-negative ints)."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation of {n} values")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain is 2^(2 * half) >= n
        self.mask = (1 << self.half) - 1
        self.keys: List[int] = [int(k) for k in np.random.SeedSequence(list(key)).generate_state(ROUNDS, np.uint64)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: int) -> int:
        """The image of ``index`` (``0 <= index < n``)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside 0..{self.n - 1}")
        value = self._feistel(index)
        while value >= self.n:  # cycle walking: stay inside 0..n-1
            value = self._feistel(value)
        return value

    def many(self, indices: np.ndarray) -> np.ndarray:
        """The images of ``indices`` (vectorised; for whole shares, tests and tools)."""
        half, mask = np.uint64(self.half), np.uint64(self.mask)

        def feistel(x):
            left, right = x >> half, x & mask
            for k in self.keys:
                h = right ^ np.uint64(k)
                h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                h = h ^ (h >> np.uint64(31))
                left, right = right, left ^ (h & mask)
            return (left << half) | right

        with np.errstate(over="ignore"):
            values = feistel(np.asarray(indices, dtype=np.uint64))
            outside = values >= np.uint64(self.n)
            while outside.any():
                values[outside] = feistel(values[outside])
                outside = values >= np.uint64(self.n)
        return values.astype(np.int64)


def epoch_shuffle(n: int, seed: int, epoch: int, salt: Optional[int] = None) -> IndexShuffle:
    return IndexShuffle(n, [seed, epoch] + ([salt] if salt is not None else []))

"""Which samples a data-parallel rank reads, in which order, epoch after epoch.

Epoch ``e`` is a permutation of all ``N`` sample indices drawn from ``(seed, e)`` (identity
without shuffling); rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``. Ranks are
therefore disjoint and together cover every sample exactly once per epoch, for any number of
shards (sample-level split, so a dataset with fewer shards than ranks still works), and every
rank's share differs by at most one sample. The order is a pure function of
``(seed, epoch, rank, world)``, so a position ``(epoch, i)`` is all a resumed run needs.
Memory: the epoch's permutation is drawn into int32 (the same order numpy's ``permutation``
gives in int64: its shuffle draws depend on the length only), and a rank keeps its own share:
4 N bytes while an epoch's order is drawn, ``4 N / W`` after (40 MB and 5 MB at 10M samples
and 8 ranks; before, 80 MB held by every rank). ``order="stateless"`` (``data.order``) maps each
position through a keyed bijection instead (``index_shuffle.py``): no array at any size, another
order than numpy's, the same properties (disjoint ranks covering the epoch, a pure function of
``(seed, epoch, rank, world)``, independent of ``W`` as a global index).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from casa_megatron.data.index_shuffle import epoch_shuffle


def rank_share(num_samples: int, rank: int, world: int) -> int:
    """How many of an epoch's ``num_samples`` positions rank ``rank`` of ``world`` reads."""
    return len(range(rank, num_samples, world))


ORDERS = ("permutation", "stateless")


class RankOrder:
    def __init__(self, num_samples: int, rank: int, world: int, seed: int, shuffle: bool = True,
                 salt: Optional[int] = None, order: str = "permutation"):
        if not 0 <= rank < world:
            raise ValueError(f"dp_rank={rank} must lie in [0, dp_size={world})")
        if num_samples < world:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than dp_size={world} ranks")
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.salt = salt  # blended sources: each its own permutation (source 0 keeps the unsalted one)
        if order not in ORDERS:
            raise ValueError(f"data.order={order!r} must be one of {ORDERS}")
        self.stateless = order == "stateless" and shuffle  # index_shuffle.py: no array at all
        self._epoch: Optional[int] = None
        self._order: Optional[np.ndarray] = None
        self._shuffle = None  # stateless: this epoch's bijection

    def _bijection(self, epoch: int):
        if self._epoch != epoch or self._shuffle is None:
            self._shuffle, self._epoch = epoch_shuffle(self.num_samples, self.seed, epoch, self.salt), epoch
        return self._shuffle

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[n_rank] sample indices this rank reads in ``epoch`` (stateless: computed for tools
        and tests; the loader asks ``sample_at`` one position at a time)."""
        if self.stateless:
            return self._bijection(epoch).many(np.arange(self.rank, self.num_samples, self.world))
        if self._epoch != epoch:
            self._order = None  # the previous epoch's share goes before the next is drawn
            perm = np.arange(self.num_samples, dtype=np.int32 if self.num_samples < 2**31 else np.int64)
            if self.shuffle:
                key = [self.seed, epoch] + ([self.salt] if self.salt is not None else [])
                np.random.default_rng(key).shuffle(perm)
            # a copy, so that the whole permutation is freed (a strided view would keep it alive)
            self._order, self._epoch = perm[self.rank::self.world].copy(), epoch
        return self._order

    def epoch_length(self, epoch: int = 0) -> int:
        return rank_share(self.num_samples, self.rank, self.world)

    def sample_at(self, epoch: int, position: int) -> int:
        if self.stateless:
            if not 0 <= position < self.epoch_length():
                raise IndexError(f"position {position} of an epoch of {self.epoch_length()} on this rank")
            return self._bijection(epoch)(self.rank + position * self.world)
        return int(self.epoch_order(epoch)[position])

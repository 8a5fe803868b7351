"""``data_for_chunks``: under the interleaved schedule every model chunk reads every micro-batch,
in the source's order, while the source is read once."""

from __future__ import annotations

from casa_megatron.training.step import data_for_chunks


class _Counting:
    def __init__(self, n: int):
        self.items, self.reads = iter(range(n)), 0

    def __iter__(self):
        return self

    def __next__(self):
        self.reads += 1
        return next(self.items)


def test_one_chunk_reads_the_source_itself():
    source = _Counting(3)
    assert data_for_chunks(source, 1) is source


def test_each_chunk_sees_the_source_in_order_and_the_source_is_read_once():
    source = _Counting(8)
    feeds = data_for_chunks(source, 2)
    # megatron's interleaved order at PP=2, 8 micro-batches: groups of 2 per chunk
    order = [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    seen = {0: [], 1: []}
    for chunk in order:
        seen[chunk].append(next(feeds[chunk]))
    assert seen == {0: list(range(8)), 1: list(range(8))}
    assert source.reads == 8
    assert not feeds[0].shared.kept  # nothing held once every chunk has read it


def test_batches_are_held_only_until_the_slowest_chunk_reads_them():
    feeds = data_for_chunks(_Counting(6), 3)
    for _ in range(4):
        next(feeds[0])
    next(feeds[1])
    assert list(feeds[0].shared.kept) == [0, 1, 2, 3]
    next(feeds[2])
    assert list(feeds[0].shared.kept) == [1, 2, 3]
    assert [next(feeds[2]) for _ in range(3)] == [1, 2, 3]

"""The training iterator: exact resume, disjoint and covering DP ranks, determinism, workers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator
from casa_megatron.data.sampler import RankOrder
from casa_megatron.model.batch import VLMBatch


def _cfg(tiny_dataset, **kw) -> DataConfig:
    base = dict(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=160, num_workers=2,
                pack_buffer=10, log_interval=0)
    base.update(kw)
    return DataConfig(**base)


def _same(a: VLMBatch, b: VLMBatch) -> bool:
    def eq(x, y):
        return x is y is None or (x is not None and y is not None and torch.equal(x, y))

    return all(eq(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(VLMBatch))


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tiny_dataset, workers):
    cfg = _cfg(tiny_dataset, num_workers=workers)
    reference = make_train_iterator(cfg, 2, 0, 1, seed=5)
    expected = _take(reference, 14)  # several epochs of the 22-sample dataset
    assert reference.stats()["epoch"] >= 2
    reference.close()

    first = make_train_iterator(cfg, 2, 0, 1, seed=5)
    _take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-safe, as a checkpoint would store it
    assert state["buffer"], "the test should resume with samples waiting in the packing buffer"
    first.close()
    resumed = make_train_iterator(cfg, 2, 0, 1, seed=5)
    resumed.load_state_dict(state)
    for i, batch in enumerate(_take(resumed, 8)):
        assert _same(batch, expected[6 + i]), f"batch {6 + i} differs after resume"
    assert resumed.stats()["batches"] == 14
    resumed.close()


def test_resume_refuses_a_different_layout(tiny_dataset):
    it = make_train_iterator(_cfg(tiny_dataset), 1, 0, 2, seed=0)
    next(it)
    state = it.state_dict()
    other = make_train_iterator(_cfg(tiny_dataset), 1, 1, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank=0 vs 1"):
        other.load_state_dict(state)
    it.close(), other.close()


@pytest.mark.parametrize("world", [2, 3, 7])
def test_rank_orders_are_disjoint_and_cover_each_epoch(world):
    for epoch in (0, 1):
        orders = [RankOrder(22, r, world, seed=3).epoch_order(epoch) for r in range(world)]
        flat = [int(i) for o in orders for i in o]
        assert sorted(flat) == list(range(22))  # disjoint and covering
        assert max(map(len, orders)) - min(map(len, orders)) <= 1
    assert not (RankOrder(22, 0, 1, 3).epoch_order(0) == RankOrder(22, 0, 1, 3).epoch_order(1)).all()


def test_dp_ranks_read_disjoint_samples_covering_the_dataset(tiny_dataset):
    """Real iterators on 2 ranks, in storage order: one epoch each, keys disjoint and covering."""
    cfg = _cfg(tiny_dataset, shuffle=False, pack_buffer=1, num_workers=0)
    keys = []
    for rank in range(2):
        it = make_train_iterator(cfg, 1, rank, 2, seed=0)
        rank_keys = []
        while it.stats()["samples_seen"] < 11:
            next(it)
            rank_keys += [s.key for s in it.last_batch_samples]
        assert it.stats()["samples_skipped"] == 0
        keys.append(rank_keys[:11])
        it.close()
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 22


def test_same_seed_same_batches_other_seed_other_order(tiny_dataset):
    cfg = _cfg(tiny_dataset)
    a, b, c = (make_train_iterator(cfg, 2, 0, 1, seed=s) for s in (1, 1, 2))
    assert all(_same(x, y) for x, y in zip(_take(a, 3), _take(b, 3)))
    next(c)
    next(b)
    assert [s.key for s in c.last_batch_samples] != [s.key for s in b.last_batch_samples]
    for it in (a, b, c):
        it.close()


def test_worker_count_and_kind_do_not_change_the_stream(tiny_dataset):
    sync = make_train_iterator(_cfg(tiny_dataset, num_workers=0), 2, 0, 1, seed=4)
    threads = make_train_iterator(_cfg(tiny_dataset, num_workers=2), 2, 0, 1, seed=4)
    processes = make_train_iterator(_cfg(tiny_dataset, num_workers=2, worker_type="process"), 2, 0, 1, seed=4)
    for x, y, z in zip(_take(sync, 3), _take(threads, 3), _take(processes, 3)):
        assert _same(x, y) and _same(x, z)
    for it in (sync, threads, processes):
        it.close()


def test_stats_report_progress_and_efficiency(tiny_dataset):
    it = make_train_iterator(_cfg(tiny_dataset), 2, 0, 1, seed=0)
    _take(it, 4)
    st = it.stats()
    assert st["batches"] == 4 and st["samples_skipped"] == 0
    assert st["samples_seen"] == st["packed_samples"] + st["buffered"]
    assert 0 < st["text_utilization"] <= 1 and 0 < st["image_utilization"] <= 1
    assert st["samples_per_s"] > 0 and st["decode_s_per_sample"] > 0
    it.close()


def test_manifest_and_shards_give_the_same_samples(tiny_dataset):
    a = make_train_iterator(_cfg(tiny_dataset, num_workers=0), 2, 0, 1, seed=9)
    manifest = _cfg(tiny_dataset, num_workers=0, source=str(tiny_dataset["manifest"]))
    b = make_train_iterator(manifest, 2, 0, 1, seed=9)
    assert _same(next(a), next(b))


def test_synthetic_source_is_resumable_and_unchanged(tiny_dataset):
    from casa_megatron.data.synthetic import synthetic_batches

    cfg = DataConfig()
    it = make_train_iterator(cfg, 2, 1, 2, seed=3)
    legacy = synthetic_batches(2, cfg.seq_length, cfg.image_size, seed=3 + 1)  # the loop's old call
    first = _take(it, 3)
    assert all(_same(x, y) for x, y in zip(first, _take(legacy, 3)))
    state = json.loads(json.dumps(it.state_dict()))
    expected = _take(it, 2)
    again = make_train_iterator(cfg, 2, 1, 2, seed=3)
    again.load_state_dict(state)
    assert all(_same(x, y) for x, y in zip(expected, _take(again, 2)))
    st = again.stats()
    assert st["batches"] == 5 and st["text_utilization"] == pytest.approx(30 / 32)


def test_a_new_micro_batch_size_continues_the_same_stream(tiny_dataset):
    """A resumed run may change micro_batch_size (a batch-size ramp): the saved position (draws and
    samples waiting to be packed) is the same stream, only packed into other micro-batches. Every
    sample drawn so far is packed exactly once, before or after the change, or still waits."""
    cfg = _cfg(tiny_dataset, num_workers=0, pack_buffer=4)
    before = make_train_iterator(cfg, 2, 0, 1, seed=5)
    packed_before = [info.key for _ in range(1) for info in (next(before), before.last_batch_samples)[1]]
    state = json.loads(json.dumps(before.state_dict()))
    before.close()
    after = make_train_iterator(cfg, 1, 0, 1, seed=5)
    after.load_state_dict(state)
    packed_after = [info.key for _ in range(2) for info in (next(after), after.last_batch_samples)[1]]
    end = after.state_dict()
    waiting = [after.sources[0].key(after.blend.sample_index(s, d)) for s, d in end["buffer"]]
    drawn = end["counts"][0]
    assert drawn < 22, "the test stays inside the first epoch, where every key is one sample"
    order = RankOrder(22, 0, 1, 5).epoch_order(0)[:drawn]
    expected = sorted(after.sources[0].key(int(i)) for i in order)
    assert sorted(packed_before + packed_after + waiting) == expected  # none lost, none twice
    assert packed_before and packed_after
    after.close()

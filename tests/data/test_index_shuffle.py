"""data/index_shuffle.py and ``data.order: stateless``: a bijection of 0..n-1 for every n, keyed,
well spread, computed one index at a time with no array (a billion samples), and the sampler,
loader and resharding built on it keep their properties."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from data.helpers import batch_keys

from casa_megatron.data.index_shuffle import IndexShuffle, epoch_shuffle
from casa_megatron.data.reshard import global_index
from casa_megatron.data.sampler import RankOrder


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 256, 257, 1000, 4097])
def test_a_bijection_for_every_size_and_the_vectorised_form_agrees(n):
    shuffle = IndexShuffle(n, [7, 1])
    images = [shuffle(i) for i in range(n)]
    assert sorted(images) == list(range(n))
    assert shuffle.many(np.arange(n)).tolist() == images
    with pytest.raises(IndexError):
        shuffle(n)


def test_keys_give_different_orders_and_the_order_is_well_spread():
    n = 10000
    a, b, c = (epoch_shuffle(n, seed, epoch).many(np.arange(n)) for seed, epoch in ((0, 0), (0, 1), (1, 0)))
    assert (a == epoch_shuffle(n, 0, 0).many(np.arange(n))).all()  # a pure function of its key
    assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99
    assert (a != epoch_shuffle(n, 0, 0, salt=1).many(np.arange(n))).mean() > 0.99
    for order in (a, b, c):
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05  # no trace of the identity
        assert (np.abs(np.diff(order)) == 1).mean() < 0.01  # neighbours do not stay neighbours
    # over many epochs, where sample 0 lands is spread over the positions (10 bins, 2000 epochs)
    landing = [int(np.argmax(epoch_shuffle(10, 3, e).many(np.arange(10)) == 0)) for e in range(2000)]
    counts = np.bincount(landing, minlength=10)
    assert counts.min() > 140 and counts.max() < 260, counts  # 200 expected in each


def test_a_billion_samples_cost_no_memory():
    tracemalloc.start()
    order = RankOrder(1_000_000_000, 3, 8, seed=5, order="stateless")
    picks = [order.sample_at(2, p) for p in (0, 1, 124_999_999)]
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100_000 and all(0 <= x < 1_000_000_000 for x in picks) and len(set(picks)) == 3
    assert order.epoch_length() == 125_000_000


def test_rank_shares_are_disjoint_cover_the_epoch_and_follow_global_indices():
    n, world = 1003, 4
    orders = [RankOrder(n, r, world, seed=9, order="stateless") for r in range(world)]
    shares = [o.epoch_order(3) for o in orders]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    alone = RankOrder(n, 0, 1, seed=9, order="stateless")
    for r, o in enumerate(orders):  # a rank's draw is the global position the resharding names
        for draw in (0, 5, o.epoch_length() - 1):
            index = global_index(draw, r, world, n)
            assert o.sample_at(3, draw) == alone.sample_at(3 + index // n, index % n)
    assert RankOrder(n, 0, 1, seed=9, shuffle=False, order="stateless").sample_at(0, 17) == 17


def test_the_loader_resumes_a_stateless_order_and_refuses_another_order(tiny_dataset, tmp_path):
    from casa_megatron.data.config import DataConfig
    from casa_megatron.data.loader import make_train_iterator

    base = dict(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=192, num_workers=0,
                pack_buffer=2, log_interval=0)
    cfg = DataConfig(**base, order="stateless")
    cfg.validate()

    it = make_train_iterator(cfg, 2, 0, 1, seed=4)
    first = batch_keys(it, 3)
    state = json.loads(json.dumps(it.state_dict()))
    after = batch_keys(it, 3)
    it.close()
    assert state["order"] == "stateless"
    resumed = make_train_iterator(cfg, 2, 0, 1, seed=4)
    resumed.load_state_dict(state)
    assert batch_keys(resumed, 3) == after
    resumed.close()
    from casa_megatron.data.reshard import reshard_position

    carried = reshard_position([state], 0, 1).state  # a resume at another dp_size keeps the order
    assert carried["order"] == "stateless"
    moved = make_train_iterator(cfg, 2, 0, 1, seed=4)
    moved.load_state_dict(carried)
    moved.close()
    permutation = make_train_iterator(DataConfig(**base), 2, 0, 1, seed=4)
    assert batch_keys(permutation, 3) != first  # another order of the same samples
    with pytest.raises(ValueError, match="order=None vs 'stateless'|order='stateless'"):
        make_train_iterator(cfg, 2, 0, 1, seed=4).load_state_dict(
            json.loads(json.dumps(permutation.state_dict())))
    permutation.close()
    with pytest.raises(Exception, match="data.order='random' must be one of"):
        DataConfig(**base, order="random").validate()

"""The data position carried over a change of the data-parallel size (data/reshard.py): no sample
lost, nothing below the watermark read twice, the re-read ones counted; through real loaders and
through a resumed training run that goes from two data-parallel ranks to one. Also a run resumed
with another micro-batch size keeps its position."""

from __future__ import annotations

import json
import random

import pytest

from casa_megatron.data.reshard import draws_below, global_index, reshard_position


def _state(rank, world, sizes, counts, buffer, seed=3):
    return {"version": 2, "kind": "shards", "seed": seed, "dp_rank": rank, "dp_size": world,
            "sources": [{"num_samples": n, "weight": 1.0} for n in sizes], "counts": counts, "buffer": buffer,
            "good_in_epoch": [1] * len(sizes), "counters": {"seen": sum(counts), "skipped": 1, "epochs_done": 2},
            "skipped_by_reason": {"decode_error": 1}, "skipped_keys": {"decode_error": [f"bad{rank}"]},
            "pack_stats": {"batches": 4}}


def _random_layout(rng, world, sizes):
    """Old ranks a few samples apart (packing takes variable-length samples), some samples still
    waiting in their packing buffers, positions spanning epochs."""
    base = [rng.randrange(0, 3 * n) for n in sizes]
    states = []
    for r in range(world):
        counts = [max(0, b + rng.randrange(-4, 5)) for b in base]
        buffer = [[s, d] for s, c in enumerate(counts) for d in range(max(0, c - 3), c) if rng.random() < 0.4]
        states.append(_state(r, world, sizes, counts, buffer))
    rng.shuffle(states)  # any order
    return states


@pytest.mark.parametrize("world, new_world", [(2, 1), (2, 3), (3, 2), (4, 6), (1, 3)])
def test_no_sample_is_lost_and_only_the_counted_ones_are_read_again(world, new_world):
    rng = random.Random(world * 10 + new_world)
    sizes = [22, 7]  # a blend: the small source runs through more epochs
    for _ in range(25):
        old = _random_layout(rng, world, sizes)
        out = [reshard_position(old, r, new_world) for r in range(new_world)]
        reread = 0
        for s, size in enumerate(sizes):
            used = set()
            for st in old:
                waiting = {d for src, d in st["buffer"] if src == s}
                used |= {global_index(d, st["dp_rank"], world, size)
                         for d in range(st["counts"][s]) if d not in waiting}
            mark = out[0].watermarks[s]
            horizon = max(used | {mark}) + 3 * size
            upcoming = set()
            for r, o in enumerate(out):
                d = o.state["counts"][s]
                while (g := global_index(d, r, new_world, size)) < horizon:
                    upcoming.add(g)
                    d += 1
            assert set(range(mark)) <= used  # everything below the watermark was used ...
            assert not upcoming & set(range(mark))  # ... and is not read again
            assert set(range(horizon)) <= used | upcoming  # nothing is lost
            reread += len(used & upcoming)
        assert out[0].reread == reread
        for o in out:  # the new ranks agree on where each source continues
            assert o.watermarks == out[0].watermarks
            assert o.state["dp_size"] == new_world and o.state["buffer"] == []
        assert out[0].state["counters"]["seen"] == sum(st["counters"]["seen"] for st in old)
        assert out[0].state["skipped_by_reason"] == {"decode_error": world}
        assert all(o.state["counters"] == {} for o in out[1:])


def test_draw_arithmetic_round_trips():
    for world in (1, 2, 3, 5):
        for rank in range(world):
            for draw in range(60):
                g = global_index(draw, rank, world, 22)
                assert g % 22 % world == rank
                assert draws_below(g, rank, world, 22) == draw and draws_below(g + 1, rank, world, 22) == draw + 1


@pytest.mark.parametrize("change, match", [
    (lambda states: states[:1], r"dp ranks \[0\] do not make up a layout of dp_size=2"),
    (lambda states: [{**s, "kind": "synthetic"} for s in states], "only the shard loader"),
    (lambda states: [states[0], {**states[1], "seed": 9}], "disagree on the seed"),
    (lambda states: [{**s, "version": 1} for s in states], "version"),
])
def test_states_that_cannot_be_carried_are_named(change, match):
    old = [_state(r, 2, [22], [5], []) for r in range(2)]
    with pytest.raises(ValueError, match=match):
        reshard_position(change(old), 0, 1)


def _cfg(tiny_dataset):
    from casa_megatron.data.config import DataConfig

    return DataConfig(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=160, num_workers=0,
                      pack_buffer=10, log_interval=0)


@pytest.mark.parametrize("new_world", [1, 3])
def test_real_loaders_continue_at_the_watermark(tiny_dataset, new_world):
    """Two loaders take three micro-batches each, a new layout continues from their saved states:
    each new rank's first draw is the sample at its first global index at or past the watermark."""
    from casa_megatron.data.loader import make_train_iterator
    from casa_megatron.data.sampler import RankOrder

    cfg = _cfg(tiny_dataset)
    old = []
    for r in range(2):
        it = make_train_iterator(cfg, 2, r, 2, seed=5)
        for _ in range(3):
            next(it)
        old.append(json.loads(json.dumps(it.state_dict())))
        it.close()
    size = old[0]["sources"][0]["num_samples"]
    for r in range(new_world):
        moved = reshard_position(old, r, new_world)
        it = make_train_iterator(cfg, 2, r, new_world, seed=5)
        it.load_state_dict(moved.state)  # accepted as this rank's own position
        draw = moved.state["counts"][0]
        epoch, position = divmod(global_index(draw, r, new_world, size), size)
        expected = it.sources[0].key(RankOrder(size, 0, 1, 5).epoch_order(epoch)[position])
        next(it)
        assert expected in {info.key for info in it.last_batch_samples}
        assert it.state_dict()["counts"][0] > draw
        it.close()


def _train(rank, world, run_dir, shards, steps, extra=()):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu.yaml",
                      [f"run_dir={run_dir}", f"data.source={shards}", "data.sources=[]", "data.num_workers=0",
                       f"data.tokenizer_path={shards.parent / 'tokenizer'}", f"train_steps={steps}", "log_interval=1",
                       "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=3",
                       "tracking.enabled=false", "eval_interval=0", "global_batch_size=4", *extra])
    return train(cfg)


def test_a_run_resumed_on_fewer_ranks_keeps_its_data_position(tiny_dataset, tmp_path, caplog):
    """Three steps at DP=2, then one rank: the position carries over (the run's sample count goes
    on from where it was instead of starting afresh at epoch 0)."""
    import logging

    from support.dist import run_distributed

    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=2, run_dir=str(run_dir), shards=tiny_dataset["shards"], steps=3)
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with caplog.at_level(logging.INFO, logger="casa_megatron.train"):
        run_distributed(_train, world_size=1, run_dir=str(run_dir), shards=tiny_dataset["shards"], steps=4)
    after = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    seen = [r["data_samples_seen"] for r in after]
    assert seen[:3] == [r["data_samples_seen"] for r in before]
    assert seen[3] > seen[2]  # counted on from the DP=2 run's total


def test_a_run_resumed_with_another_micro_batch_size_keeps_its_data_position(tiny_dataset, tmp_path):
    """A batch-size ramp: micro_batch_size 2 -> 1 on resume; the sample count goes on."""
    from support.dist import run_distributed

    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir), shards=tiny_dataset["shards"], steps=3)
    run_distributed(_train, world_size=1, run_dir=str(run_dir), shards=tiny_dataset["shards"], steps=4,
                    extra=["micro_batch_size=1"])
    seen = [json.loads(line)["data_samples_seen"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 4 and seen[3] > seen[2]  # afresh, step 4 would count one step's samples only

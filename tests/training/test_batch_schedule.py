"""Batch-size ramp-up (``rampup_batch_size``, Megatron-LM's ``--rampup-batch-size``): the global batch
of every step follows the definition, a run resumed mid-ramp repeats the uninterrupted run's batch
sizes and losses, and layouts that cannot run whole micro-batches are refused at start."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed


def _expected(start, increment, samples, full, steps):
    """Written from the definition: the batch grows by ``increment`` each time another
    ``samples / ((full - start) / increment)`` samples have been consumed, capped at ``full``."""
    per_increment = samples / ((full - start) // increment)
    sizes, consumed = [], 0
    for _ in range(steps):
        size = full if consumed > samples else min(full, start + int(consumed / per_increment) * increment)
        sizes.append(size)
        consumed += size
    return sizes


def _config(overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig

    return load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", list(overrides))


@pytest.mark.parametrize("ramp, full, mbs, dp", [([4, 4, 16], 12, 2, 2), ([2, 2, 40], 16, 1, 2), ([8, 8, 8], 16, 2, 1)])
def test_the_schedule_follows_the_definition(ramp, full, mbs, dp):
    from casa_megatron.training.batch_schedule import BatchSchedule

    cfg = _config([f"rampup_batch_size={ramp}", f"global_batch_size={full}", f"micro_batch_size={mbs}"])
    schedule = BatchSchedule(cfg, dp)
    sizes, consumed = [], 0
    for _ in range(12):
        size, num_micro = schedule.at(consumed)
        assert num_micro * mbs * dp == size
        sizes.append(size)
        consumed += size
    assert sizes == _expected(*ramp, full, 12) and sizes[0] == ramp[0] and sizes[-1] == full
    assert schedule.consumed_after(5) == sum(sizes[:5]) and schedule.full_num_micro == full // (mbs * dp)


@pytest.mark.parametrize("overrides, message", [
    (["rampup_batch_size=[16, 4, 8]"], r"needs 1 <= start < global_batch_size=8"),
    (["rampup_batch_size=[2, 4, 8]"], r"global_batch_size - start = 6 is not a multiple of the increment 4"),
    (["rampup_batch_size=[2, 2]"], r"must be three integers"),
])
def test_contradictory_ramps_are_config_errors(overrides, message):
    from casa_megatron.config.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(overrides)


def test_sizes_that_cannot_split_over_the_data_parallel_ranks_are_refused():
    from casa_megatron.config.schema import ConfigError
    from casa_megatron.training.batch_schedule import BatchSchedule

    with pytest.raises(ConfigError, match=r"rampup_batch_size start=2 is not a multiple of micro_batch_size x "
                                          r"data-parallel size = 2 x 2 = 4"):
        BatchSchedule(_config(["rampup_batch_size=[2, 2, 8]"]), dp_size=2)
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not a multiple of .* = 2 x 3 = 6"):
        BatchSchedule(_config([]), dp_size=3)


def _train(rank, world, run_dir, steps):
    from casa_megatron.training.loop import train

    train(_config([f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "optimizer.warmup_steps=1",
                   "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=3", "tracking.enabled=false",
                   "global_batch_size=12", "rampup_batch_size=[4, 4, 16]"]))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_run_ramps_up_and_resumes_mid_ramp_to_the_same_batches_and_losses(tmp_path):
    import shutil

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    run_distributed(_train, world_size=2, run_dir=str(run), steps=6)
    rows = _rows(run)
    assert [r["global_batch_size"] for r in rows] == _expected(4, 4, 16, 12, 6) == [4, 4, 8, 12, 12, 12]
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/iter_0000006")  # resume at step 3, inside the ramp
    run_distributed(_train, world_size=2, run_dir=str(resumed), steps=6)
    for ref, got in zip(rows, _rows(resumed), strict=True):
        assert (got["step"], got["global_batch_size"], got["loss"]) == (ref["step"], ref["global_batch_size"],
                                                                       ref["loss"])

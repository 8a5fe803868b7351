"""``checkpoint.load_optimizer=false`` (Megatron-LM's ``--no-load-optim``): a resume takes the
weights, step, LR schedule and data position, and starts the optimizer afresh; what the optimizer
state is bound to (which weights train, the optimizer's kind, a ``dp_reshardable`` layout) may
then change. One or two gloo processes per run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support.dist import run_distributed

from casa_megatron.config import load_config
from casa_megatron.config.schema import TrainConfig

TINY = "configs/tiny_cpu_synthetic.yaml"
FRESH = "checkpoint.load_optimizer=false"
BETA1, BETA2 = 0.9, 0.95


def _train(rank, world, run_dir, overrides, steps):
    from casa_megatron.training.loop import train

    train(load_config(TrainConfig, TINY, [
        f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "optimizer.warmup_steps=1",
        "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=3", "tracking.enabled=false",
        f"optimizer.adam_beta1={BETA1}", f"optimizer.adam_beta2={BETA2}", *overrides]))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6, the dp_reshardable optimizer format (bound to TP / PP)."""
    run_dir = tmp_path_factory.mktemp("fresh_opt") / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir),
                    overrides=["checkpoint.optimizer_format=dp_reshardable"], steps=6)
    return run_dir


def _from_step_3(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints/iter_0000006")
    return run_dir


def _moment_ratios(checkpoint):
    """v / m^2 of every Adam moment element with m != 0."""
    from casa_megatron.training.checkpoint import read_tensors

    tensors, out = read_tensors(checkpoint), []
    for name in (n for n in tensors if n.startswith("optimizer.state.exp_avg.")):
        m = tensors[name].double().flatten()
        v = tensors[name.replace("exp_avg.", "exp_avg_sq.")].double().flatten()
        keep = m.abs() > 1e-12
        out.append((v[keep] / m[keep] ** 2).numpy())
    return np.concatenate(out)


def test_weights_and_position_load_and_adam_starts_afresh(base_run, tmp_path):
    save_4 = ["checkpoint.save_interval=1", "checkpoint.optimizer_format=fully_reshardable"]
    runs = {}
    for name, extra in (("fresh", [FRESH]), ("loaded", [])):
        runs[name] = _from_step_3(base_run, tmp_path / name)
        run_distributed(_train, world_size=1, run_dir=str(runs[name]), overrides=[*extra, *save_4], steps=4)
    ref, got = _rows(base_run), _rows(runs["fresh"])
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # step 4's loss is taken before its update: the loaded weights on the next samples of the data order
    assert got[3]["loss"] == ref[3]["loss"] and got[3]["lr_new"] == ref[3]["lr_new"]
    assert _rows(runs["loaded"])[3]["loss"] == ref[3]["loss"]
    # after one Adam step from zero moments, m = (1 - b1) g and v = (1 - b2) g^2 for every element;
    # the loaded optimizer's moments (four steps of history) are not
    fresh = _moment_ratios(runs["fresh"] / "checkpoints/iter_0000004")
    loaded = _moment_ratios(runs["loaded"] / "checkpoints/iter_0000004")
    assert fresh.size > 1000
    np.testing.assert_allclose(fresh, (1 - BETA2) / (1 - BETA1) ** 2, rtol=1e-4)
    assert not np.allclose(loaded, (1 - BETA2) / (1 - BETA1) ** 2, rtol=1e-2)


def test_what_the_optimizer_state_is_bound_to_may_change_without_it(base_run, tmp_path):
    """Trainability, the optimizer's kind and the dp_reshardable layout (TP=2 here) change on a
    fresh-optimizer resume; a resume that loads the optimizer refuses them before any write."""
    changes = ["model.freeze_lm=true", "optimizer.use_distributed_optimizer=false",
               "parallel.tensor_model_parallel_size=2"]
    run_dir = _from_step_3(base_run, tmp_path)
    with pytest.raises(AssertionError, match="must match to resume"):
        run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=changes, steps=5)
    run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=[*changes, FRESH], steps=5)
    got, ref = _rows(run_dir), _rows(base_run)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[3]["loss"] == pytest.approx(ref[3]["loss"], rel=1e-5)  # the loaded weights, now split over TP


def test_bf16_main_weights_start_from_the_loaded_ones(tmp_path):
    """bf16 with the distributed optimizer keeps fp32 main weights, copied from the model when
    the optimizer is built: a fresh optimizer must take them from the loaded checkpoint, or its
    first step would write the initial weights back. One Adam step from zero moments moves each
    element by at most the learning rate."""
    from casa_megatron.training.checkpoint import read_tensors

    bf16 = ["precision.bf16=true", "checkpoint.optimizer_format=fully_reshardable"]
    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=bf16, steps=3)
    before = read_tensors(run_dir / "checkpoints/iter_0000003")
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[*bf16, FRESH, "checkpoint.save_interval=1"],
                    steps=4)
    after = read_tensors(run_dir / "checkpoints/iter_0000004")
    lr = _rows(run_dir)[3]["lr_new"]
    prefix = "optimizer.state.param."  # the fp32 main weights; they start from the loaded bf16 weights
    main = [n for n in after if n.startswith(prefix)]
    assert len(main) > 40
    moved = max(float((after[n] - before[n[len(prefix):]].float()).abs().max()) for n in main)
    assert 0 < moved <= lr * (1 + 1e-5), (moved, lr)

"""A run that fails mid-way with its checkpoints intact: gradients that turn NaN stop it at that
step with the step and the resume point named (exit status 4); nothing of the step is applied
or saved."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed


def _poisoned_run(rank, world, run_dir, poison_call):
    """Train 8 steps (2 micro-batches per step and rank, a save every 3); the ``poison_call``-th
    forward of each rank returns NaN. Returns the error text or None."""
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import loop

    forward, calls = loop.forward_step, []

    def poisoned(data_iterator, model):
        output, loss_func = forward(data_iterator, model)
        calls.append(1)
        return (output * float("nan") if len(calls) == poison_call else output), loss_func

    loop.forward_step = poisoned
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", "train_steps=8", "log_interval=1", "optimizer.warmup_steps=1",
                       "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=3", "tracking.enabled=false"])
    try:
        loop.train(cfg)
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return f"{type(exc).__name__}: {exc}"
    return None


def test_nan_gradients_stop_the_run_at_their_step_with_the_resume_point_named(tmp_path):
    run_dir = tmp_path / "run"
    errors = run_distributed(_poisoned_run, world_size=2, run_dir=str(run_dir), poison_call=9)  # step 5
    for error in errors:
        assert error is not None and error.startswith("TrainingDiverged: training diverged at step 5: the gradients "
                                                      "are not finite (found NaN in local grad norm"), error
        assert "the newest checkpoint is iter_0000003" in error, error
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 5 never logged
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000003", "latest"]


def test_casa_train_exits_4_naming_the_failure(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from casa_megatron import train as cli
    from casa_megatron.training import loop
    from casa_megatron.training.failures import TrainingDiverged

    def diverges(cfg):
        raise TrainingDiverged(7, RuntimeError("Rank 0: Unexpected result nan (message='found NaN in local grad "
                                               "norm for bucket #0')"), Path("ckpts/iter_0000006"))

    monkeypatch.setattr(loop, "train", diverges)
    assert cli.main(["configs/tiny_cpu_synthetic.yaml", f"run_dir={tmp_path}"]) == 4
    err = capsys.readouterr().err
    assert "error: training diverged at step 7" in err and "the newest checkpoint is iter_0000006" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("message", ["found Inf in local grad norm for bucket #2", "found NaN in local grad norm"])
def test_both_non_finite_checks_of_megatron_are_recognised(message):
    from casa_megatron.training.failures import non_finite_gradients

    assert non_finite_gradients(RuntimeError(f"Rank 1, iteration -1: Unexpected result inf (message='{message}')"))
    assert not non_finite_gradients(RuntimeError("CUDA out of memory"))

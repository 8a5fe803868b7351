"""Resumable checkpoints: SIGKILL mid-run, a save killed half-way, SIGTERM / SIGINT (Ctrl-C), a
second run on the same directory, TP/PP resharding, uneven pipeline splits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.dist import run_distributed

BASE = ["train_steps=24", "log_interval=2", "checkpoint.save_interval=8",
        "optimizer.warmup_steps=4", "optimizer.wsd_decay_steps=8"]
REPO = Path(__file__).resolve().parents[2]


def _rows(run_dir: Path):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(run_dir, *extra, tracking=False):
    return [sys.executable, "-m", "casa_megatron.train", "configs/tiny_cpu_synthetic.yaml", *BASE,
            f"run_dir={run_dir}", f"tracking.enabled={str(tracking).lower()}", *extra]


def _start(cmd, stdout=False):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in map(json.loads, path.read_text().splitlines())):
            return
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_cli(run_dir), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return _rows(run_dir)


def _mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    return sorted(runs, key=lambda r: r.info.start_time)


def test_sigkill_then_resume_gives_the_uninterrupted_curve(tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    proc = _start(_cli(run_dir, tracking=True))
    _wait_for_step(proc, run_dir, 12)  # last checkpoint: step 8
    proc.kill()
    proc.wait()
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000008"
    resumed = subprocess.run(_cli(run_dir, tracking=True), cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in uninterrupted]
    for got, want in zip(rows, uninterrupted):
        assert got["loss"] == want["loss"], got["step"]  # bit-exact: same data, RNG, optimizer state
        assert got["grad_norm"] == want["grad_norm"], got["step"]
    killed, finished = _mlflow_runs(run_dir)  # the SIGKILLed run no longer claims to be RUNNING
    assert killed.info.status == "KILLED" and "casa.ended_by" in killed.data.tags
    assert finished.info.status == "FINISHED"


@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGINT, []),
                                        (signal.SIGTERM, ["checkpoint.async_save=true", "checkpoint.save_interval=3"])],
                         ids=["SIGTERM", "SIGINT", "SIGTERM_background_saves"])
def test_stop_signal_checkpoints_and_marks_the_run_killed(tmp_path, sig, extra):
    """SIGTERM (SLURM) and Ctrl-C both finish the step, save, mark the MLflow run KILLED; with
    SIGINT, a second run on the same directory is refused meanwhile, and the checkpoint resumes.
    With background saves every 3 steps, one is usually in flight when the signal arrives: the
    stop waits for it, writes the final one, and commits it before the process exits."""
    run_dir = tmp_path / "stopped"
    proc = _start(_cli(run_dir, "train_steps=2000", "optimizer.wsd_decay_steps=0", *extra, tracking=True),
                  stdout=True)
    _wait_for_step(proc, run_dir, 10)
    if sig == signal.SIGINT:
        second = subprocess.run(_cli(run_dir, "train_steps=2000", "optimizer.wsd_decay_steps=0"), cwd=REPO,
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 3, second.stderr[-3000:]
        assert f"is in use by pid {proc.pid} on host" in second.stderr and "Traceback" not in second.stderr
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert "Traceback" not in err, err[-3000:]
    step = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 10 <= step < 2000
    assert f"stopped by {sig.name} at step {step}" in out
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # every save committed
    if extra:
        assert f"checkpoint iter_{step:07d} committed: written in the background" in out
    # Honest, quiet logs: time, level and rank on every line; where things are, up front; no
    # start-up warnings that nobody can act on.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[rank 0\] casa_megatron.train: run dir "
                     rf"{re.escape(str(run_dir))} \| checkpoints .* \| MLflow sqlite:", out, re.M), out[:2000]
    assert not re.search(r"Warning:|warnings.warn|Rerun State Machine|MLflow database", err + out), err
    run, = _mlflow_runs(run_dir)
    assert run.info.status == "KILLED"
    assert run.data.tags["checkpoint_dir"] == str((run_dir / "checkpoints").resolve())
    if sig == signal.SIGINT:  # the checkpoint it wrote loads and training goes on from it
        summary, = run_distributed(_train, world_size=1, run_dir=str(run_dir),
                                   overrides=[f"train_steps={step + 2}", "optimizer.wsd_decay_steps=0"])
        assert summary["steps"] == step + 2 and _rows(run_dir)[-1]["step"] == step + 2


def test_second_ctrl_c_exits_at_once(tmp_path):
    run_dir = tmp_path / "impatient"
    proc = _start(_cli(run_dir, "train_steps=2000", "optimizer.wsd_decay_steps=0"))
    _wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGINT)
    lines = []
    while not any("SIGINT received" in line for line in lines):  # the first one was handled
        lines.append(proc.stderr.readline().decode())
        assert lines[-1], "".join(lines)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = "".join(lines) + proc.stderr.read().decode()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: exited at once"), err


def _train(rank, world, run_dir, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [*BASE, f"run_dir={run_dir}", "tracking.enabled=false", *overrides])
    return train(cfg)


def _die_during_save(rank, world, run_dir):
    """Kill the process after the model/optimizer shards of step 16 are written, before the
    checkpoint is complete (the stand-in for SIGKILL half-way through a save)."""
    from casa_megatron.training import checkpoint

    original = checkpoint.save_run_config

    def save_run_config(config, folder, **kwargs):
        if "iter_0000016" in str(folder):
            os._exit(9)
        original(config, folder, **kwargs)

    checkpoint.save_run_config = save_run_config
    return _train(rank, world, run_dir, [])


def _train_until(rank, world, run_dir, overrides, stop_after):
    """Full 24-step schedule, stopped after ``stop_after`` steps through the SIGTERM path."""
    from casa_megatron.training import loop

    calls = {"n": 0}

    def any_rank(flag):
        calls["n"] += 1
        return calls["n"] >= stop_after

    loop._any_rank = any_rank
    return _train(rank, world, run_dir, overrides)


def test_save_killed_half_way_leaves_previous_checkpoint(tmp_path, uninterrupted):
    run_dir = tmp_path / "halfsave"
    with pytest.raises(AssertionError, match="without reporting"):
        run_distributed(_die_during_save, world_size=1, run_dir=str(run_dir))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000008"  # the pointer never moved
    assert (ckpts / "iter_0000016.tmp").exists()  # the half-written save, never renamed
    assert not (ckpts / "iter_0000016").exists()
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[])
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    rows = _rows(run_dir)
    assert [r["loss"] for r in rows] == [r["loss"] for r in uninterrupted]


@pytest.mark.parametrize("save_at, load_at", [
    (["parallel.tensor_model_parallel_size=2"], []),
    ([], ["parallel.pipeline_model_parallel_size=2"]),
])
def test_checkpoint_loads_at_another_layout(tmp_path, uninterrupted, save_at, load_at):
    """Train 8 steps at one layout, resume at another: steps 9..24 follow the one-process curve."""
    run_dir = tmp_path / "reshard"
    world = 2 if save_at else 1
    run_distributed(_train_until, world_size=world, run_dir=str(run_dir), overrides=save_at, stop_after=8)
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000008"
    (run_dir / "metrics.jsonl").unlink()
    run_distributed(_train, world_size=2 if load_at else 1, run_dir=str(run_dir), overrides=load_at)
    rows = _rows(run_dir)
    want = {r["step"]: r for r in uninterrupted}
    assert [r["step"] for r in rows] == list(range(10, 25, 2))
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]]["loss"], rel=1e-4, abs=1e-5), row["step"]


def test_uneven_pipeline_split_trains_and_resumes_at_another_split(tmp_path):
    """A 3-layer LM at PP=2, split 1 + 2 (``parallel.num_layers_in_first_pipeline_stage=1``) for 8
    steps, then resumed at split 2 + 1 (``num_layers_in_last_pipeline_stage=1``): every logged step,
    before and after the resume, follows the one-process curve of the same model."""
    three, pp2 = ["model.lm.num_layers=3"], ["parallel.pipeline_model_parallel_size=2"]
    reference = tmp_path / "one_process"
    run_distributed(_train, world_size=1, run_dir=str(reference), overrides=three)
    want = {r["step"]: r["loss"] for r in _rows(reference)}
    run_dir = tmp_path / "uneven"
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8,
                    overrides=[*three, *pp2, "parallel.num_layers_in_first_pipeline_stage=1"])
    saved = (run_dir / "checkpoints" / "iter_0000008" / "config.yaml").read_text()
    assert "num_layers_in_first_pipeline_stage: 1" in saved
    run_distributed(_train, world_size=2, run_dir=str(run_dir),
                    overrides=[*three, *pp2, "parallel.num_layers_in_last_pipeline_stage=1"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]], rel=1e-4, abs=1e-5), row["step"]
    _check_pipeline_balance(rows, three, {8: [1, 2], 24: [2, 1]})


def test_encoder_over_two_stages_trains_and_resumes_across_the_split(tmp_path, uninterrupted):
    """The vision encoder over both stages of PP=2 (``parallel.vision_blocks_per_pipeline_stage=[1,1]``:
    stage 0 embeds and runs block 0, stage 1 block 1, the projector and both LM layers) for 8
    steps, resumed at PP=2 with the encoder on stage 0 for 8 more, then resumed with the split
    again (block 1's checkpoint key is its global index, loaded into stage 1's local block 0):
    every logged step follows the one-process curve."""
    pp2, split = ["parallel.pipeline_model_parallel_size=2"], ["parallel.vision_blocks_per_pipeline_stage=[1,1]"]
    want = {r["step"]: r["loss"] for r in uninterrupted}
    run_dir = tmp_path / "encoder_split"
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8, overrides=[*pp2, *split])
    saved = yaml.safe_load((run_dir / "checkpoints" / "iter_0000008" / "config.yaml").read_text())
    assert saved["parallel"]["vision_blocks_per_pipeline_stage"] == [1, 1]
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8, overrides=pp2)
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000016"
    run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=[*pp2, *split])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]], rel=1e-4, abs=1e-5), row["step"]
    # [0, 2] LM layers with encoder blocks [1, 1], [1, 1] LM layers with the encoder on stage 0, split again
    _check_pipeline_balance(rows, [], {8: ([0, 2], [1, 1]), 16: ([1, 1], None), 24: ([0, 2], [1, 1])})


def test_interleaved_pipeline_trains_and_resumes_at_other_layouts(tmp_path):
    """The interleaved schedule (``parallel.virtual_pipeline_model_parallel_size=2``: rank 0 holds
    LM layers 0 and 2 and the encoder, rank 1 layers 1 and 3 and the output layer, tied to the
    embedding on rank 0) for 8 steps, resumed at PP=2 without virtual stages for 8, then with them
    again to the end: every logged loss and validation loss follows one process's curve."""
    model = ["model.lm.num_layers=4", "model.lm.tie_word_embeddings=true",
             "data.valid=[{path: synthetic}]", "eval_interval=8", "eval_iters=2"]
    pp2, vpp = ["parallel.pipeline_model_parallel_size=2"], ["parallel.virtual_pipeline_model_parallel_size=2"]
    reference = tmp_path / "one_process"
    run_distributed(_train, world_size=1, run_dir=str(reference), overrides=model)
    want = {(r["step"], key): r[key] for r in _rows(reference) for key in ("loss", "valid_loss") if key in r}
    run_dir = tmp_path / "interleaved"
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8, overrides=[*model, *pp2, *vpp])
    saved = yaml.safe_load((run_dir / "checkpoints" / "iter_0000008" / "config.yaml").read_text())
    assert saved["parallel"]["virtual_pipeline_model_parallel_size"] == 2
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8, overrides=[*model, *pp2])
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000016"
    run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=[*model, *pp2, *vpp])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, 25, 2))
    assert [r["step"] for r in rows if "valid_loss" in r] == [8, 16, 24]
    for row in rows:
        key = "loss" if "loss" in row else "valid_loss"
        assert row[key] == pytest.approx(want[row["step"], key], rel=1e-4, abs=1e-5), (row["step"], key)
    # per rank: its two chunks' layers (virtual stages r and r + 2); plain PP=2 in steps 9-16
    _check_pipeline_balance([r for r in rows if "loss" in r], model,
                            {8: {"virtual": [1, 1, 1, 1]}, 16: [2, 2], 24: {"virtual": [1, 1, 1, 1]}})
    # a weights-only start (checkpoint.pretrained) with virtual stages, adding DoRA adapters to the
    # frozen LM: their magnitudes come from the loaded weights, so step 1 computes the loaded model
    start = [f"checkpoint.pretrained={run_dir / 'checkpoints'}", "train_steps=2", "log_interval=1",
             "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=0", "eval_interval=0"]
    plain, dora = tmp_path / "from_pretrained", tmp_path / "from_pretrained_dora"
    run_distributed(_train, world_size=1, run_dir=str(plain), overrides=[*model, *start])
    run_distributed(_train, world_size=2, run_dir=str(dora), overrides=[
        *model, *start, *pp2, *vpp, "model.freeze_lm=true", "model.lora.rank=2", "model.lora.dora=true"])
    assert _rows(dora)[0]["loss"] == pytest.approx(_rows(plain)[0]["loss"], rel=1e-5)
    assert _rows(dora)[0]["loss"] < want[2, "loss"] - 0.1  # the trained weights, not a fresh model


def test_interleaved_pipeline_with_uneven_stages_trains_and_resumes(tmp_path):
    """Uneven stages cut into chunks (6 LM layers, ``num_layers_in_first_pipeline_stage=2``: rank 0
    holds layers 0 and 3 beside the encoder, rank 1 layers 1-2 and 4-5) for 8 steps, resumed with
    the same stages as plain 1F1B (2 + 4 layers) to the end: the logged losses follow one
    process's curve, and each step's pipeline balance is that of the split it ran with."""
    model = ["model.lm.num_layers=6", "train_steps=16"]
    uneven = ["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=2"]
    vpp = ["parallel.virtual_pipeline_model_parallel_size=2"]
    reference = tmp_path / "one_process"
    run_distributed(_train, world_size=1, run_dir=str(reference), overrides=model)
    want = {r["step"]: r["loss"] for r in _rows(reference) if "loss" in r}
    run_dir = tmp_path / "uneven_interleaved"
    run_distributed(_train_until, world_size=2, run_dir=str(run_dir), stop_after=8, overrides=[*model, *uneven, *vpp])
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000008"
    run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=[*model, *uneven])
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]], rel=1e-4, abs=1e-5), row["step"]
    _check_pipeline_balance(rows, model, {8: {"virtual": [1, 2, 1, 2]}, 16: [2, 4]})


def _check_pipeline_balance(rows, overrides, splits):
    """Each row's ``pipeline_balance`` (mean / max stage FLOPs) is that of its step's own
    micro-batches (the synthetic iterator replayed) on the split the step ran with (``splits``:
    last step -> LM layers per stage, or (LM layers, encoder blocks) per stage, or
    ``{"virtual": LM layers per virtual stage}`` for the interleaved schedule at PP=2)."""
    import dataclasses

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.data import make_train_iterator
    from casa_megatron.training.flops import microbatch_flops

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*BASE, *overrides])
    data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
    data = make_train_iterator(data_cfg, cfg.micro_batch_size, 0, 1, cfg.data.seed, fusion="casa")
    micro = cfg.global_batch_size // cfg.micro_batch_size
    logged = {r["step"]: r for r in rows}
    for step in range(1, max(logged) + 1):
        counts = [microbatch_flops(cfg.model, next(data), cfg.data.image_seq_length) for _ in range(micro)]
        if step not in logged:
            continue
        layers = splits[min(s for s in splits if s >= step)]
        if isinstance(layers, dict):  # virtual stage v * 2 + r runs on rank r
            virtual = [sum(mb.stage_totals(layers["virtual"])[k] for mb in counts) for k in range(len(layers["virtual"]))]
            stages = [sum(virtual[r::2]) for r in range(2)]
        else:
            layers, blocks = layers if isinstance(layers, tuple) else (layers, None)
            stages = [sum(sum(mb.stages(layers, blocks)[k]) for mb in counts) for k in range(len(layers))]
        assert logged[step]["pipeline_balance"] == pytest.approx(sum(stages) / len(stages) / max(stages), rel=1e-9)
        assert logged[step]["pipeline_heaviest_stage_share"] == pytest.approx(max(stages) / sum(stages), rel=1e-9)


def test_exit_duration_stops_saves_and_the_next_run_goes_on(tmp_path):
    """Megatron-LM's --exit-duration-in-mins: a run past its time budget (set-up included) finishes
    the step, checkpoints it and returns like a SIGTERM; the next run resumes there."""
    run_dir = tmp_path / "budget"
    summary, = run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=["exit_duration_mins=1e-6"])
    assert summary == {"final_loss": summary["final_loss"], "steps": 1, "status": "KILLED"}
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000001"
    summary, = run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=["train_steps=4", "optimizer.warmup_steps=1",
                                                                                   "optimizer.wsd_decay_steps=0"])
    assert summary["steps"] == 4 and summary["status"] == "FINISHED"

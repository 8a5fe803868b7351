"""Safe resume (issue 12): another model is refused before any write, config changes that may
change are applied (LR schedule rebuilt), the newest *complete* checkpoint is found without
``latest``, a damaged one falls back to the previous one, unusable directories refuse to start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.dist import run_distributed

from casa_megatron.config import load_config
from casa_megatron.config.schema import TrainConfig

BASE = ["train_steps=6", "log_interval=1", "checkpoint.save_interval=3", "optimizer.warmup_steps=1",
        "optimizer.wsd_decay_steps=2", "tracking.enabled=false"]


def _cfg(run_dir, overrides=()):
    return load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*BASE, f"run_dir={run_dir}", *overrides])


def _train(rank, world, run_dir, overrides=(), hold_lock=None):
    from casa_megatron.training.loop import train

    return train(_cfg(run_dir, overrides))


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr_new"]) for r in _rows(run_dir)]


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """6 steps, checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000003", "iter_0000006", "latest"]
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return run_dir


# --- the rules, as data ---------------------------------------------------------------------
def test_rules_default_new_model_fields_to_must_match():
    from casa_megatron.training.resume import MAY_CHANGE, MUST_MATCH, classify

    assert classify("model.lm.num_layers") == MUST_MATCH
    assert classify("model.vision.some_field_added_later") == MUST_MATCH
    assert classify("model.transformer_impl") == MAY_CHANGE
    assert classify("model.vision.trainable_blocks") == MUST_MATCH
    assert classify("model.vision.trainable_blocks", weights_only=True) == MAY_CHANGE
    assert classify("train_steps") == classify("optimizer.lr_new") == classify("data.source") == MAY_CHANGE
    assert classify("parallel.tensor_model_parallel_size") == MAY_CHANGE
    assert classify("optimizer.use_distributed_optimizer") == MUST_MATCH
    # LoRA adapters are trainability: fixed on resume, free for a weights-only start
    assert classify("model.lora.rank") == MUST_MATCH
    assert classify("model.lora.targets", weights_only=True) == MAY_CHANGE
    assert classify("model.vision.lora.rank", weights_only=True) == MAY_CHANGE


def test_a_field_missing_from_an_older_checkpoint_counts_as_its_default():
    from casa_megatron.training.resume import compare

    cfg = _cfg("x")
    saved = json.loads(json.dumps(__import__("dataclasses").asdict(cfg)))
    del saved["model"]["fusion"]["normalize_images"]  # as if written before the field existed
    saved["train_steps"] = 3
    diff = compare(saved, cfg)
    assert diff.mismatched == [] and diff.changed == [("train_steps", 3, 6)]
    saved["model"]["fusion"]["normalize_images"] = False
    assert compare(saved, cfg).mismatched == [("model.fusion.normalize_images", False, True)]


# --- refused before anything is written ------------------------------------------------------
@pytest.mark.parametrize("override, names", [
    ("model.lm.num_layers=1", "model.lm.num_layers: checkpoint 2, config 1"),
    ("model.lm.num_layers=4", "model.lm.num_layers: checkpoint 2, config 4"),
    ("model.fusion.placement=before", "model.fusion.placement: checkpoint 'parallel', config 'before'"),
    ("model.fusion.mechanism=cross_attention", "model.fusion.mechanism: checkpoint 'casa', config 'cross_attention'"),
    ("model.lm.hidden_size=128", "model.lm.hidden_size: checkpoint 64, config 128"),
])
def test_another_model_is_refused_before_any_write(run_copy, override, names):
    before = _snapshot(run_copy)
    with pytest.raises(AssertionError, match="ResumeMismatch") as info:
        run_distributed(_train, world_size=1, run_dir=str(run_copy), overrides=[override])
    assert names in str(info.value)
    assert _snapshot(run_copy) == before  # config.yaml, metrics.jsonl, checkpoints: untouched


def test_unwritable_checkpoint_dir_fails_before_step_1(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    run_dir = tmp_path / "run"
    with pytest.raises(AssertionError, match=r"CheckpointError: checkpoint dir .*a_file/ckpt is not writable"):
        run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[f"checkpoint.dir={tmp_path}/a_file/ckpt"])
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


def test_resume_false_refuses_to_overwrite_checkpoints(run_copy):
    before = _snapshot(run_copy)
    with pytest.raises(AssertionError, match="checkpoint.resume=false, but .* already holds checkpoints"):
        run_distributed(_train, world_size=1, run_dir=str(run_copy), overrides=["checkpoint.resume=false"])
    assert _snapshot(run_copy) == before


def _train_beside_a_holder(rank, world, run_dir, held, overrides=()):
    from casa_megatron.runtime.lock import RunDirLock

    with RunDirLock(held):  # stands for another live run using this directory
        return _train(rank, world, run_dir, overrides)


@pytest.mark.parametrize("shared", ["run_dir", "checkpoint_dir_elsewhere"])
def test_a_second_run_on_a_locked_dir_is_refused(run_copy, tmp_path, shared):
    before = _snapshot(run_copy)
    held, run_dir, overrides = run_copy, run_copy, []
    if shared == "checkpoint_dir_elsewhere":  # another run dir, same checkpoints
        held, run_dir, overrides = run_copy / "checkpoints", tmp_path / "other", [f"checkpoint.dir={run_copy}/checkpoints"]
    with pytest.raises(AssertionError, match=rf"RunDirBusy: run dir {held} is in use by pid \d+ on host"):
        run_distributed(_train_beside_a_holder, world_size=1, run_dir=str(run_dir), held=str(held), overrides=overrides)
    assert _snapshot(run_copy) == before


# --- what may change is applied ----------------------------------------------------------------
def _reference_lrs(cfg, steps):
    """lr_new after each step, from megatron's scheduler built fresh from ``cfg`` (the oracle)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Groups:
        param_groups = [{"max_lr": cfg.optimizer.lr_new, "min_lr": cfg.optimizer.lr_new * cfg.optimizer.min_lr_ratio}]

    opt = cfg.optimizer
    sched = OptimizerParamScheduler(_Groups(), 0.0, opt.lr_pretrained, opt.lr_pretrained * opt.min_lr_ratio,
                                    opt.warmup_steps, cfg.train_steps, opt.decay_style, 0.0, 0.0, cfg.train_steps,
                                    "constant", wsd_decay_steps=opt.wsd_decay_steps, lr_wsd_decay_style="linear")
    out = {}
    for step in range(1, max(steps) + 1):
        sched.step(1)
        out[step] = _Groups.param_groups[0]["lr"]
    return [out[s] for s in steps]


def test_extended_run_trains_at_the_configured_lr(run_copy):
    """The base run decayed to LR 0 at its last step 6; extended to 12 steps with another peak LR
    (and another data seed), steps 7..12 follow the schedule of the new config."""
    changes = ["train_steps=12", "optimizer.lr_new=1e-3", "data.seed=3"]
    summary, = run_distributed(_train, world_size=1, run_dir=str(run_copy), overrides=changes)
    assert summary["steps"] == 12
    rows = _rows(run_copy)
    assert [r["step"] for r in rows] == list(range(1, 13))
    new = [r for r in rows if r["step"] > 6]
    want = _reference_lrs(_cfg(run_copy, changes), [r["step"] for r in new])
    assert [r["lr_new"] for r in new] == pytest.approx(want, rel=1e-12)
    assert new[0]["lr_new"] == pytest.approx(1e-3)  # not 0: the old schedule had ended
    assert new[0]["loss"] < rows[0]["loss"]  # the weights were restored, not re-initialised


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(run_copy, base_run):
    (run_copy / "checkpoints" / "latest").unlink()
    shutil.rmtree(run_copy / "checkpoints" / "iter_0000003")  # only the newest is left
    (run_copy / "checkpoints" / "iter_0000009.tmp").mkdir()  # a half-written save: ignored
    summary, = run_distributed(_train, world_size=1, run_dir=str(run_copy), overrides=["train_steps=8"])
    rows = _rows(run_copy)
    assert summary["steps"] == 8 and [r["step"] for r in rows] == list(range(1, 9))
    assert rows[:6] == _rows(base_run)  # resumed at 6: nothing truncated or retrained


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "zeros":
        path.write_bytes(bytes(len(data)))


@pytest.mark.parametrize("name, how, verify, aside", [
    ("__0_0.distcp", "truncate", "checksum", "damaged"),
    ("__0_1.distcp", "flip", "checksum", "damaged"),
    (".metadata", "truncate", "checksum", "damaged"),
    ("metadata.json", "truncate", "checksum", "damaged"),
    ("trainer.pt", "truncate", "checksum", "damaged"),
    ("rank_00000.pt", "flip", "checksum", "damaged"),
    ("manifest.json", "truncate", "checksum", "damaged"),
    ("trainer.pt", "zeros", "size", "unloadable"),  # passes a size-only check, fails to load
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run_copy, base_run, name, how, verify, aside):
    ckpts = run_copy / "checkpoints"
    _damage(ckpts / "iter_0000006" / name, how)
    run_distributed(_train, world_size=1, run_dir=str(run_copy), overrides=[f"checkpoint.verify={verify}"])
    # resumed at step 3 and retrained 4..6: exactly the base run's numbers
    assert _curve(run_copy) == _curve(base_run)
    kept = ckpts / f"iter_0000006.{aside}"
    assert (kept / name).exists(), sorted(p.name for p in ckpts.iterdir())  # set aside, never deleted
    assert (ckpts / "iter_0000006" / "manifest.json").exists() and (ckpts / "latest").read_text() == "iter_0000006"


def test_no_usable_checkpoint_refuses_to_start_over(run_copy):
    ckpts = run_copy / "checkpoints"
    for step in (3, 6):
        _damage(ckpts / f"iter_{step:07d}" / "trainer.pt", "truncate")
    before = _snapshot(run_copy)
    with pytest.raises(AssertionError, match=r"CheckpointError: .* holds checkpoints but none can be used "
                                             r"\(iter_0000006: .*trainer.pt has \d+ bytes"):
        run_distributed(_train, world_size=1, run_dir=str(run_copy))
    assert _snapshot(run_copy) == before

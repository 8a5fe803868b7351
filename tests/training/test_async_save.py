"""Checkpoints written in the background (``checkpoint.async_save``): the same files as a synchronous
save although training goes on changing the weights while they are written, committed only once
every rank's writer finished, resumable to the same losses, and a failed write commits nothing.
Two gloo processes (DP=2, distributed optimizer) through the training loop."""

from __future__ import annotations

import json

import numpy as np
from support.dist import run_distributed
from test_overlap import _checkpoint_tensors

HOLD_S = 1.5  # each background writer waits this long before writing: later steps run meanwhile


def _train(rank, world, run_dir, overrides, steps, hold_s=0.0, fail_at=None):
    """Train; returns (steps that ran while a write was in flight, the error text or None)."""
    import functools
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import checkpoint_async
    from casa_megatron.training.loop import train

    if hold_s:  # in the forked writer, before the first byte: the parent trains on meanwhile
        writer = filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc

        def held(*args, **kwargs):
            time.sleep(hold_s)
            return writer(*args, **kwargs)

        filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(held)
    if fail_at is not None:  # the disk fills up while this step's shards are written
        write_item = filesystem_async._write_item

        @functools.wraps(write_item)  # megatron reads its signature
        def full_disk(*args, **kwargs):
            if any(f"iter_{fail_at:07d}" in str(getattr(a, "name", "")) for a in args):  # the open file
                raise OSError(28, "No space left on device")
            return write_item(*args, **kwargs)

        filesystem_async._write_item = full_disk
    overlapped = []
    poll = checkpoint_async.BackgroundWrites.poll

    def counting_poll(self, wait=False):
        if self.pending_step is not None and not wait:
            done = poll(self, wait)
            if done is None:
                overlapped.append(self.pending_step)
            return done
        return poll(self, wait)

    checkpoint_async.BackgroundWrites.poll = counting_poll
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "optimizer.warmup_steps=2",
                       "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=3", "tracking.enabled=false",
                       *overrides])
    try:
        train(cfg)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return overlapped, f"{type(exc).__name__}: {exc}"
    return overlapped, None


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_background_writes_hold_the_step_they_name_and_resume_to_the_same_losses(tmp_path):
    """The writer starts 1.5 s late, so later optimizer steps change every weight and Adam moment
    before it writes a byte; its checkpoints must still equal, tensor for tensor and bit for bit,
    the synchronous run's of the same step (the fork is the snapshot on the CPU; on a GPU megatron
    copies to host memory before forking)."""
    import shutil

    sync, background, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    run_distributed(_train, world_size=2, run_dir=str(sync), overrides=[], steps=8)
    out = run_distributed(_train, world_size=2, run_dir=str(background), overrides=["checkpoint.async_save=true"],
                          steps=8, hold_s=HOLD_S)
    for rank in range(2):
        overlapped, error = out[rank]
        assert error is None, error
        assert overlapped.count(3) >= 2 and overlapped.count(6) >= 1, overlapped  # training went on meanwhile
    for ref, got in zip(_rows(sync), _rows(background), strict=True):
        keys = ("step", "loss", "grad_norm", "lr_new")
        assert [got[k] for k in keys] == [ref[k] for k in keys]
    ckpts = background / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000006", "iter_0000008", "latest"]  # keep_last=2
    assert (ckpts / "latest").read_text() == "iter_0000008"
    for step in (6, 8):
        ref = _checkpoint_tensors(sync / f"checkpoints/iter_{step:07d}")
        got = _checkpoint_tensors(ckpts / f"iter_{step:07d}")
        assert ref.keys() == got.keys() and len(ref) > 100
        for name, value in ref.items():
            np.testing.assert_array_equal(got[name].numpy(), value.numpy(), err_msg=f"step {step}: {name}")
        # the background writer checksums the shards it wrote: the same sizes and CRC-32 as the
        # synchronous save's, whose files hold the same bytes (the resume below verifies them too)
        shards = [{n: e for n, e in json.loads((run / f"checkpoints/iter_{step:07d}/manifest.json").read_text())
                   ["files"].items() if n.endswith(".distcp")} for run in (sync, background)]
        assert shards[0] == shards[1] and len(shards[0]) >= 2
    later = _checkpoint_tensors(ckpts / "iter_0000008")
    assert any(not np.array_equal(later[n].numpy(), v.numpy())
               for n, v in _checkpoint_tensors(ckpts / "iter_0000006").items())  # the steps in between moved them

    shutil.copytree(background, resumed)
    shutil.rmtree(resumed / "checkpoints/iter_0000008")
    run_distributed(_train, world_size=2, run_dir=str(resumed), overrides=["checkpoint.async_save=true"], steps=8)
    for ref, got in zip(_rows(background), _rows(resumed), strict=True):
        assert got["step"] == ref["step"] and got["loss"] == ref["loss"], got["step"]


def test_a_failed_background_write_commits_nothing_and_the_run_resumes_from_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    out = run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=["checkpoint.async_save=true"],
                          steps=6, fail_at=6)
    for rank in range(2):  # every rank stops, naming the checkpoint and the cause
        error = out[rank][1]
        assert error is not None and "CheckpointWriteError: checkpoint iter_0000006 was not written" in error, error
        assert "No space left on device" in error, error
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000003", "iter_0000006.tmp", "latest"]
    assert (ckpts / "latest").read_text() == "iter_0000003"

    out = run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=["checkpoint.async_save=true"], steps=6)
    assert out[0][1] is None and out[1][1] is None
    assert [r["step"] for r in _rows(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 4-6 again
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000003", "iter_0000006", "latest"]

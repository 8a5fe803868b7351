"""The Qwen2.5-VL encoder with a zero-padded MLP (width 90 -> 96) checkpoints at TP=2 and resumes
at TP=1 on the one-process curve: the padding depends on the config only, so the padded weights
have the same global shape at every TP size."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed

QWEN = ["model.vision.encoder=qwen2_5_vl", "model.vision.temporal_patch_size=2", "model.vision.window_size=28",
        "model.vision.fullatt_block_indexes=[1]", "model.vision.ffn_hidden_size=90",
        "model.vision.ffn_pad_multiple=8"]
BASE = ["train_steps=8", "log_interval=1", "optimizer.warmup_steps=2", "optimizer.wsd_decay_steps=2",
        "tracking.enabled=false", *QWEN]


def _train(rank, world, run_dir, overrides, stop_after=None):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import loop

    if stop_after is not None:  # the SIGTERM path: checkpoint at that step and stop
        calls = {"n": 0}

        def any_rank(flag):
            calls["n"] += 1
            return calls["n"] >= stop_after

        loop._any_rank = any_rank
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*BASE, f"run_dir={run_dir}", *overrides])
    return loop.train(cfg)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_padded_qwen_encoder_reshards_tp2_to_tp1(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "reshard"
    run_distributed(_train, world_size=1, run_dir=str(ref_dir), overrides=[])
    run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=["parallel.tensor_model_parallel_size=2"],
                    stop_after=4)
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000004"
    (run_dir / "metrics.jsonl").unlink()
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[])
    want, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-5), step

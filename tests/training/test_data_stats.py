"""Skipped samples are totalled by reason across the run and reach metrics.jsonl and MLflow."""

from __future__ import annotations

import json

from data.helpers import qa_json, solid_png, write_shard_dir
from support.dist import run_distributed


def _train(rank, world, run_dir, source):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu.yaml", [
        f"run_dir={run_dir}", f"data.source={source}", "train_steps=4", "log_interval=2",
        "global_batch_size=4", "data.seq_length=64", "data.image_seq_length=96", "data.num_workers=0",
        "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=1", "checkpoint.save_interval=0",
        "tracking.system_metrics=false", "data.pixel_budget=12544"])
    return train(cfg)


def test_skip_totals_reach_metrics_jsonl_and_mlflow(tmp_path):
    from casa_megatron.data.synthetic_dataset import make_dataset

    paths = make_dataset(tmp_path / "data", num_images=12, num_videos=0, samples_per_shard=6, progress=False)
    bad = {"bad_png": {"png": b"\x89PNG broken", "json": qa_json()},
           "no_json": {"png": solid_png()},
           "bad_png2": {"png": b"also broken", "json": qa_json()}}
    write_shard_dir(tmp_path / "bad", bad, per_shard=3)
    (tmp_path / "bad" / "shard-000000.tar").rename(paths["shards"] / "shard-zzz.tar")
    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir), source=str(paths["shards"]))

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["data_samples_skipped"] > 0
    assert last["data_skipped/corrupt_image"] + last["data_skipped/missing_annotation"] == last["data_samples_skipped"]
    assert last["data_skipped/corrupt_image"] >= 1 and last["data_skipped/missing_annotation"] >= 1
    assert last["data_samples_seen"] >= last["data_samples_skipped"] + 8  # 4 steps x 2 micro-batches x >=1 sample

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    for name in ("data_samples_seen", "data_samples_skipped", "data_skipped/corrupt_image",
                 "data_skipped/missing_annotation"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [r["step"] for r in rows], name
        assert history[-1].value == last[name], name

"""``check_weights_across_dp_interval`` (``training/replica_check.py``): data-parallel replicas
compared weight by weight. Two gloo ranks: identical replicas pass and a one-ulp difference in one
element of one weight on one rank stops both, naming it; a DP=2 run with the distributed
optimizer and overlapped parameter gathering keeps its replicas identical at every step."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed

from casa_megatron.config import load_config
from casa_megatron.config.schema import TrainConfig

TINY = "configs/tiny_cpu_synthetic.yaml"
TARGET = "decoder.layers.1.mlp.linear_fc2.weight"


def _compare(rank, world):
    import torch

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.replica_check import ReplicasDiverged, check_replicas

    cfg = load_config(TrainConfig, TINY, [])
    initialize_parallel(1, 1, cfg.seed)  # two ranks: DP=2
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
    check_replicas([model], 1)  # the same seed: the same weights
    if rank == 1:
        with torch.no_grad():
            weight = dict(model.named_parameters())[TARGET]
            weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(float("inf")))
    try:
        check_replicas([model], 2)
    except ReplicasDiverged as exc:
        return str(exc)
    return None


def test_a_one_ulp_difference_on_one_rank_stops_both():
    messages = run_distributed(_compare, world_size=2)
    for message in messages:
        assert message is not None and message.startswith("step 2: data-parallel replicas hold different values "
                                                          f"of 1 weights (0.{TARGET})"), message


def _train(rank, world, run_dir):
    from casa_megatron.training.loop import train

    return train(load_config(TrainConfig, TINY, [
        f"run_dir={run_dir}", "train_steps=4", "log_interval=1", "tracking.enabled=false", "optimizer.warmup_steps=1",
        "optimizer.wsd_decay_steps=0",
        "check_weights_across_dp_interval=1", "parallel.overlap_grad_reduce=true",
        "parallel.overlap_param_gather=true", "parallel.ddp_bucket_size=4000", "precision.bf16=true"]))


def test_a_data_parallel_run_keeps_its_replicas_identical(tmp_path):
    summaries = run_distributed(_train, world_size=2, run_dir=str(tmp_path / "run"))
    assert [s["steps"] for s in summaries] == [4, 4]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

"""The training loop end to end on one process: loss falls, artifacts and MLflow records exist."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed


def _train(rank, world, run_dir):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", "train_steps=120", "log_interval=20"])
    return train(cfg)


def test_tiny_run_learns_and_is_tracked(tmp_path):
    from casa_megatron.training.loop import TEXT_ONLY_FLOOR

    run_dir = tmp_path / "run"
    summary, = run_distributed(_train, world_size=1, run_dir=str(run_dir))
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["loss"] < TEXT_ONLY_FLOOR  # only reachable by reading the images
    assert (run_dir / "config.yaml").exists() and (run_dir / "loss.png").stat().st_size > 0
    _check_throughput(rows)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion.mechanism"] == "casa"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [20, 40, 60, 80, 100, 120]
    assert history[-1].value == pytest.approx(rows[-1]["loss"])


def _check_throughput(rows):
    """The logged model FLOPs and answer tokens are those of the step's own micro-batches (the
    synthetic iterator replayed: 4 micro-batches per step), counted by training/flops.py; no
    peak is known on a CPU, so no mfu."""
    import dataclasses

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.data import make_train_iterator
    from casa_megatron.training.flops import microbatch_flops

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [])
    data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
    data = make_train_iterator(data_cfg, cfg.micro_batch_size, 0, 1, cfg.data.seed, fusion="casa")
    micro = cfg.global_batch_size // cfg.micro_batch_size
    by_step = {}
    for step in range(1, rows[1]["step"] + 1):
        batches = [next(data) for _ in range(micro)]
        by_step[step] = (sum(microbatch_flops(cfg.model, b, cfg.data.image_seq_length).total for b in batches),
                         sum(float(b.loss_mask.sum()) for b in batches))
    for row in rows[:2]:
        flops, answer_tokens = by_step[row["step"]]
        assert row["tflops_per_device"] * 1e12 * row["step_time_s"] == pytest.approx(flops, rel=1e-9)
        assert row["answer_tokens_per_s"] * row["step_time_s"] == pytest.approx(answer_tokens, rel=1e-9)
        assert "mfu" not in row


def test_cli_reports_config_errors(capsys):
    from casa_megatron.train import main

    assert main(["configs/tiny_cpu_synthetic.yaml", "global_batch_size=7"]) == 2
    assert "global_batch_size=7" in capsys.readouterr().err


def _short_run(rank, world, run_dir, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", "train_steps=12", "log_interval=4",
                       "optimizer.warmup_steps=4", "optimizer.wsd_decay_steps=4",
                       "tracking.enabled=false", *overrides])
    train(cfg)


def test_tensor_parallel_training_follows_single_process_curve(tmp_path):
    """12 optimizer steps at TP=2 + sequence parallelism (2 processes) give the losses and the
    global grad norms of the single-process run; and the single-process run with the reference
    paths of before (dense block-causal self-attention mask, image tokens through the whole fused
    QKV) gives the same curve as the default packed / K/V-only paths."""
    curves = {}
    for name, world, overrides in (("tp1", 1, []),
                                   ("tp2_sp", 2, ["parallel.tensor_model_parallel_size=2",
                                                  "parallel.sequence_parallel=true"]),
                                   ("tp1_reference_paths", 1, ["model.packed_attention=false",
                                                               "model.fusion.image_kv_only=false"])):
        run_dir = tmp_path / name
        run_distributed(_short_run, world_size=world, run_dir=str(run_dir), overrides=overrides)
        curves[name] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for other in ("tp2_sp", "tp1_reference_paths"):
        for ref, got in zip(curves["tp1"], curves[other], strict=True):
            assert got["step"] == ref["step"]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4), other
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), other
            # model FLOPs per step (per device x world size x step time): TP splits the same
            # FLOPs; the reference paths' dense mask is not model FLOPs, but the whole fused QKV
            # on the image slots runs: 3 passes x 2 CASA layers x 4 micro-batches of a
            # [48 slots, 64] x [64, 64 query rows] GEMM more
            world, extra = (2, 0) if other == "tp2_sp" else (1, 3 * 2 * 4 * 2 * 48 * 64 * 64)
            assert got["tflops_per_device"] * 1e12 * world * got["step_time_s"] == pytest.approx(
                ref["tflops_per_device"] * 1e12 * ref["step_time_s"] + extra, rel=1e-9), other


def test_qk_layernorm_training_at_tp2_follows_single_process_curve(tmp_path):
    """Qwen3's per-head q/k norms: each TP rank's norm gradient covers its own heads only, and
    the training loop relies on megatron's finalize_model_grads summing them over TP (by name,
    because the TransformerConfig says ``qk_layernorm``), here without sequence parallelism,
    where nothing else would. 12 steps at TP=2 give the single-process losses and grad norms."""
    curves = {}
    for name, world, overrides in (("tp1", 1, []), ("tp2", 2, ["parallel.tensor_model_parallel_size=2"])):
        run_dir = tmp_path / name
        run_distributed(_short_run, world_size=world, run_dir=str(run_dir),
                        overrides=["model.lm.qk_layernorm=true", "log_interval=1", *overrides])
        curves[name] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curves["tp1"]] == list(range(1, 13))
    # Tighter than the test above: left unsummed, the norms' halves move each rank's copy apart by
    # only ~1e-5 (loss) and ~6e-5 (grad norm) relative in these 12 steps (measured by leaving
    # qk_layernorm out of the TransformerConfig); summed, the curves agree to ~5e-8.
    for ref, got in zip(curves["tp1"], curves["tp2"], strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)

"""bf16 everywhere, on CPU: every fusion with each encoder trains through the real loop
(megatron DDP, distributed optimizer with fp32 main weights) with bf16 parameters."""

from __future__ import annotations

import json
import math

import pytest
from support.dist import run_distributed

QWEN = ["model.vision.encoder=qwen2_5_vl", "model.vision.temporal_patch_size=2",
        "model.vision.fullatt_block_indexes=[1]", "model.vision.window_size=28"]
STEPS = 8


def _bf16_run(rank, world, run_dir, overrides):
    import torch

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import loop

    built = {}
    build = loop.build_model_chunks

    def spy(*args, **kwargs):  # keep the model to look at its dtypes afterwards
        built["model"] = build(*args, **kwargs)
        return built["model"]

    loop.build_model_chunks = spy
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", f"train_steps={STEPS}", "log_interval=1", "precision.bf16=true",
                       "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=0", "tracking.enabled=false",
                       *overrides])
    loop.train(cfg)
    dtypes = {str(p.dtype) for p in built["model"].parameters()}
    return {"dtypes": sorted(dtypes), "patch_embed": str(built["model"][0].vision.patch_embed.weight.dtype)}


@pytest.mark.parametrize("mechanism", ["casa", "cross_attention", "insertion"])
@pytest.mark.parametrize("encoder", ["tiny_vit", "qwen2_5_vl"])
def test_bf16_training_steps(tmp_path, mechanism, encoder):
    overrides = [f"model.fusion.mechanism={mechanism}"] + (QWEN if encoder == "qwen2_5_vl" else [])
    report, = run_distributed(_bf16_run, world_size=1, run_dir=str(tmp_path), overrides=overrides)
    assert report["dtypes"] == ["torch.bfloat16"] and report["patch_embed"] == "torch.bfloat16"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns


ADAPTERS = {"lora_dropout": ["model.lora.dropout=0.1"],
            # DoRA on the LM and on the Qwen2.5-VL encoder's blocks (its padded MLP: 90 -> 96 units)
            "dora_lm_and_qwen_encoder": ["model.lora.dora=true", *QWEN, "model.vision.ffn_hidden_size=90",
                                         "model.vision.ffn_pad_multiple=8", "model.vision.trainable_blocks=0",
                                         "model.vision.lora.rank=2", "model.vision.lora.dora=true"]}


@pytest.mark.parametrize("adapters", list(ADAPTERS))
def test_bf16_lora_training_steps_at_tp2_with_sequence_parallelism(tmp_path, adapters):
    """LoRA adapters (with dropout), or DoRA, in bf16, TP=2 + SP: bf16 adapters, and it learns."""
    overrides = ["model.freeze_lm=true", "model.lora.rank=4", *ADAPTERS[adapters],
                 "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    reports = run_distributed(_bf16_run, world_size=2, run_dir=str(tmp_path), overrides=overrides)
    assert all(r["dtypes"] == ["torch.bfloat16"] for r in reports)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2])

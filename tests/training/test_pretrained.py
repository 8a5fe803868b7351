"""Import a Qwen2.5-VL checkpoint (LM + vision encoder + merger) at TP=1 through the CLI
(``python -m casa_megatron.conversion``), then train at TP=2 + SP from ``checkpoint.pretrained``
as the Qwen2.5-VL-3B recipe does (CASA, LM frozen, only the last ViT block, the projector and
CASA train): losses finite and falling. With the LM trained too: PP=2 (tied embeddings split
over two stages) follows the TP=2 curve; a checkpoint to resume from takes precedence over the
pretrained weights; a next stage starts from that training checkpoint with a fresh optimizer. LoRA
adapters on the frozen LM start from the import as the model without them (same first loss)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.dist import run_distributed
from support.hf import make_hf_model, save_hf_model

REPO = Path(__file__).resolve().parents[2]
# The vision architecture (and the LM's) comes from the import; the recipe says what trains.
RECIPE = """\
model:
  vision: {trainable_blocks: 1}
  fusion: {mechanism: casa, placement: parallel}
  freeze_lm: true
  transformer_impl: local
data: {source: synthetic, seq_length: 30, image_seq_length: 24, image_size: 56}
optimizer: {lr_new: 2.0e-3, lr_pretrained: 2.0e-3, warmup_steps: 0, decay_style: constant}
micro_batch_size: 2
global_batch_size: 4
train_steps: 3
log_interval: 1
"""


def _train(rank, world, recipe, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import pretrained
    from casa_megatron.training.loop import train

    loads = []
    original = pretrained.load_model_weights
    pretrained.load_model_weights = lambda model, d: (loads.append(str(d)), original(model, d))
    cfg = load_config(TrainConfig, recipe, overrides)
    assert cfg.model.lm.family == "qwen2_5_vl" and cfg.model.lm.tie_word_embeddings  # from the checkpoint
    assert (cfg.model.vision.encoder, cfg.model.vision.num_layers, cfg.model.vision.temporal_patch_size) == \
        ("qwen2_5_vl", 2, 2)
    summary = train(cfg)
    return {"loads": loads, **summary}


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_import_with_cli_then_train_at_tp2_from_pretrained(tmp_path):
    hf = save_hf_model(make_hf_model("qwen2_5_vl"), tmp_path / "hf")
    (hf / "tokenizer_config.json").write_text("{}")
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "imported"
    done = subprocess.run([sys.executable, "-m", "casa_megatron.conversion", "import-hf", str(hf), str(out),
                           "--config", str(recipe), "--dtype", "bf16", "--no-progress", "model.lora.rank=4",
                           "model.vision.lora.rank=2", "model.vision.trainable_blocks=0"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-2000:]
    assert "model.lora.rank=4 is not part of an import" in done.stderr  # the backbone only
    assert "model.vision.lora.rank=2 is not part of an import" in done.stderr
    imported = yaml.safe_load((out / "model.yaml").read_text())
    assert imported["lora"]["rank"] == imported["vision"]["lora"]["rank"] == 0
    assert {"weights", "architecture.yaml", "import_report.json", "model.yaml", "hf_config.json",
            "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "import_report.json").read_text())
    assert len(report["casa_from_self_attention"]) == 4 * 4  # every layer: qkv w+b, proj, norm
    assert report["summary"]["fresh"] == 0 and report["summary"]["hf_not_imported"] == 0
    assert sum(h.startswith("visual.") for names in report["imported"].values() for h in names) == 30
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left

    frozen_dir = tmp_path / "run_frozen_lm"  # the Qwen2.5-VL-3B recipe's training
    common = [f"checkpoint.pretrained={out}", "tracking.enabled=false", "parallel.tensor_model_parallel_size=2"]
    first = run_distributed(_train, world_size=2, recipe=str(recipe),
                            overrides=[*common, f"run_dir={frozen_dir}", "parallel.sequence_parallel=true"])
    assert [r["loads"] for r in first] == [[str(out)]] * 2
    rows = [json.loads(l) for l in (frozen_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(l) for l in losses)
    assert losses[2] < losses[0], losses

    lora_dir = tmp_path / "run_lora"  # LoRA adapters on the frozen LM, absent from the import: B = 0
    lora = [*common, f"run_dir={lora_dir}", "parallel.sequence_parallel=true", "model.lora.rank=4",
            "model.vision.trainable_blocks=0", "model.vision.lora.rank=2",  # and on the Qwen2.5-VL blocks
            "checkpoint.async_save=true", "checkpoint.optimizer_format=dp_reshardable"]  # as the recipes save
    run_distributed(_train, world_size=2, recipe=str(recipe), overrides=lora)
    lora_losses = _losses(lora_dir)
    assert lora_losses[0] == losses[0]  # the same function before the first update
    assert lora_losses[2] < lora_losses[0] and lora_losses[1:] != pytest.approx(losses[1:], rel=1e-6), lora_losses
    resumed = run_distributed(_train, world_size=2, recipe=str(recipe), overrides=[*lora, "train_steps=5"])
    assert [r["loads"] for r in resumed] == [[]] * 2 and len(_losses(lora_dir)) == 5  # adapters resumed
    straight = tmp_path / "run_lora_straight"  # the same 5 steps without the stop at step 3
    run_distributed(_train, world_size=2, recipe=str(recipe),
                    overrides=[*lora, f"run_dir={straight}", "train_steps=5"])
    assert _losses(lora_dir) == pytest.approx(_losses(straight), rel=1e-5)  # adapters and their Adam state resumed

    run_dir = tmp_path / "run"  # the LM trains too: its tied embedding is updated on both PP stages
    trained = [*common, f"run_dir={run_dir}", "parallel.sequence_parallel=true", "model.freeze_lm=false"]
    run_distributed(_train, world_size=2, recipe=str(recipe), overrides=trained)
    losses = _losses(run_dir)
    assert losses[2] < losses[0] and losses != pytest.approx(_losses(frozen_dir), rel=1e-4), losses

    pp_dir = tmp_path / "run_pp2"
    run_distributed(_train, world_size=2, recipe=str(recipe),
                    overrides=[f"checkpoint.pretrained={out}", f"run_dir={pp_dir}", "tracking.enabled=false",
                               "model.freeze_lm=false", "parallel.pipeline_model_parallel_size=2"])
    assert _losses(pp_dir) == pytest.approx(losses, rel=1e-4)  # the tied weight's two copies stay in sync

    again = run_distributed(_train, world_size=2, recipe=str(recipe), overrides=[*trained, "train_steps=5"])
    assert [r["loads"] for r in again] == [[]] * 2  # resumed from run_dir/checkpoints instead
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]

    stage2 = tmp_path / "stage2"  # weights (and architecture) of run_dir's latest checkpoint, step 1 again
    nxt, = run_distributed(_train, world_size=1, recipe=str(recipe),
                           overrides=[f"checkpoint.pretrained={run_dir / 'checkpoints'}", f"run_dir={stage2}",
                                      "tracking.enabled=false", "train_steps=1", "model.freeze_lm=false"])
    assert nxt["loads"] == [str(run_dir / "checkpoints")]
    first = json.loads((stage2 / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] < losses[0] - 0.05  # same first batch, trained weights

"""The fusion-quality benchmark runs end to end on the real generated dataset (task=generated) on a
micro budget, and reports per-question-type accuracy for every fusion and the no-vision control."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MICRO = {
    "model": {"lm": {"vocab_size": 256, "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                     "num_query_groups": 2, "ffn_hidden_size": 64},
              "vision": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64},
              "fusion": {"placement": "parallel"}, "transformer_impl": "local"},
    "task": "generated", "fusions": ["casa", "cross_attention", "insertion"], "control_fusion": "casa",
    "steps": 3, "micro_batch_size": 2, "num_microbatches": 1, "warmup_steps": 1, "eval_batches": 3,
    "generated": {"num_images": 12, "num_videos": 2, "eval_num_images": 12, "eval_num_videos": 2,
                  "video_seconds": 2.0,
                  "data": {"seq_length": 64, "image_seq_length": 72, "pixel_budget": 28224,
                           "video_pixel_budget": 3136, "max_frames": 4, "num_workers": 0, "log_interval": 0}},
}
TYPES = ["coarse", "fine", "caption"]


def test_generated_task_reports_per_type_accuracy(tmp_path):
    cfg = dict(MICRO, generated=dict(MICRO["generated"], dir=str(tmp_path / "data")))
    config, out = tmp_path / "micro.yaml", tmp_path / "out" / "quality.json"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fusion_quality.py"), "--config", str(config), "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["task"] == "generated" and report["type_names"] == TYPES
    info = report["task_info"]
    assert info["train_split"] != info["held_out_split"]  # evaluation on a separate generated split
    assert info["tokenizer_vocab"] <= 256
    results = report["results"]
    assert [r["fusion"] for r in results] == ["casa", "cross_attention", "insertion", "casa (noise images)"]
    assert [r["noise_images"] for r in results] == [False, False, False, True]
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["answers"] > 0
        for t in TYPES:
            assert r[f"answers_{t}"] > 0, (t, r)
            assert 0.0 <= r[f"accuracy_{t}"] <= 1.0, (t, r)

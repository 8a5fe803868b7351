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
    "steps": 3, "micro_batch_size": 2, "num_microbatches": 1, "warmup_steps": 1, "eval_batches": 50,
    "seeds": [1, 2],
    "generated": {"num_images": 12, "num_videos": 2, "eval_num_images": 12, "eval_num_videos": 2,
                  "video_seconds": 2.0,
                  "data": {"seq_length": 64, "image_seq_length": 72, "pixel_budget": 28224,
                           "video_pixel_budget": 3136, "max_frames": 4, "num_workers": 0, "log_interval": 0}},
}
TYPES = ["coarse", "fine", "caption"]
QUESTIONS = ["shape", "colour", "count", "number", "word", "chart"]


def test_generated_task_reports_per_type_accuracy(tmp_path):
    """Two seeds x (3 fusions + control); every held-out answer scored exactly once per run."""
    cfg = dict(MICRO, generated=dict(MICRO["generated"], dir=str(tmp_path / "data")))
    config, out = tmp_path / "micro.yaml", tmp_path / "out" / "quality.json"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fusion_quality.py"), "--config", str(config), "--json", str(out),
         "--plot", str(tmp_path / "out" / "loss.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["task"] == "generated" and report["type_names"] == TYPES and report["detail_names"] == QUESTIONS
    info = report["task_info"]
    assert info["train_split"] != info["held_out_split"]  # evaluation on a separate generated split
    assert info["tokenizer_vocab"] <= 256
    results = report["results"]
    labels = ["casa", "cross_attention", "insertion", "casa (noise images)"]
    assert [r["fusion"] for r in results] == labels * 2
    assert [r["seed"] for r in results] == [1] * 4 + [2] * 4
    assert [r["noise_images"] for r in results] == [False, False, False, True] * 2
    # every held-out image question is one answer word: the coarse / fine / per-question answer
    # counts are the held-out split's turns, i.e. each held-out sample was scored once, none twice
    raw = Path(info["held_out_split"]) / "raw"
    turns = [t for p in raw.glob("img_*.json") for t in json.loads(p.read_text())["conversation"]]
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["answers"] == results[0]["answers"] > 0
        assert r["answers_coarse"] == sum(t["type"] == "coarse" for t in turns)
        assert r["answers_fine"] == sum(t["type"] == "fine" for t in turns)
        for q in QUESTIONS:  # answers attributed to the question that asked them
            assert r[f"answers_{q}"] == sum(t["task"] == q for t in turns), q
        for t in TYPES:
            assert r[f"answers_{t}"] > 0, (t, r)
            assert 0.0 <= r[f"accuracy_{t}"] <= 1.0, (t, r)
    summary = {row["fusion"]: row for row in report["summary"]}
    assert list(summary) == labels
    for label in labels:
        runs = [r for r in results if r["fusion"] == label]
        mean = sum(r["accuracy_coarse"] for r in runs) / 2
        assert abs(summary[label]["accuracy_coarse"] - mean) < 1e-12 and summary[label]["seeds"] == [1, 2]

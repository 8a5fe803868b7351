"""The training-efficiency benchmark runs end to end on a micro config and reports every fusion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MICRO = {
    "model": {"lm": {"vocab_size": 64, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                     "num_query_groups": 2, "ffn_hidden_size": 64},
              "vision": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64},
              "transformer_impl": "local"},
    "data": {"micro_batch_size": 2, "num_microbatches": 2, "seq_length": 12, "samples_per_row": 3,
             "image_grid": [4, 6]},
    "vision": "encoder", "warmup_steps": 1, "steps": 2,
}
KEYS = {"fusion", "peak_memory_bytes", "memory_method", "step_time_s", "text_tokens_per_s", "images_per_s"}


def test_micro_run_reports_all_fusions(tmp_path):
    config, out = tmp_path / "micro.yaml", tmp_path / "out" / "efficiency.json"
    config.write_text(yaml.safe_dump(MICRO))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_efficiency.py"), "--config", str(config),
         "--json", str(out), "--launcher", "fork"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"results", "machine", "config", "targets"}
    results = report["results"]
    assert [r["fusion"] for r in results] == ["casa", "cross_attention", "insertion"]
    for r in results:
        assert KEYS <= set(r), r.keys()
        assert r["step_time_s"] > 0 and r["text_tokens_per_s"] > 0 and r["images_per_s"] > 0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
        assert r["text_tokens_per_step"] == 2 * 2 * 12 and r["images_per_step"] == 2 * 2 * 3
        assert r["loss"] == r["loss"]  # finite training step, not NaN
    assert report["machine"]["cpu_count"] >= 1
    assert report["config"]["data"]["image_grid"] == [4, 6]
    assert results[2]["memory_vs_insertion"] == 1.0 or results[2]["peak_memory_bytes"] in (None, 0)
    # the table is printed too
    assert "| casa |" in proc.stdout and "| insertion |" in proc.stdout


def test_summary_ratios_and_targets():
    sys.path.insert(0, str(ROOT))
    from benchmarks.train_efficiency import summarize

    rows = [{"fusion": "casa", "peak_memory_bytes": 50, "text_tokens_per_s": 30.0, "params": 1},
            {"fusion": "insertion", "peak_memory_bytes": 100, "text_tokens_per_s": 20.0, "params": 1}]
    targets = summarize(rows)
    assert rows[0]["memory_vs_insertion"] == 0.5 and rows[0]["throughput_vs_insertion"] == 1.5
    assert targets["memory_target_met"] and targets["throughput_target_met"]
    rows[0]["peak_memory_bytes"] = 60
    assert not summarize(rows)["memory_target_met"]


def test_paper_config_loads_with_the_papers_token_counts():
    """``gpu_paper.yaml`` is read only by a GPU session's part (e) and (f): a schema change that broke
    it would first show there. It must load, and its batch must carry the paper's tokens per step:
    2,048 text and 20,480 image tokens (10 image tokens per text token), 16 samples in one row."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import image_heavy_batch
    from benchmarks.train_efficiency import load

    cfg = load(str(ROOT / "benchmarks" / "configs" / "gpu_paper.yaml"), [])
    data = cfg.data
    assert (cfg.dtype, cfg.vision, cfg.fusions) == ("bfloat16", "frozen_stub", ["casa", "cross_attention", "insertion"])
    batch = image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed)
    assert tuple(batch.input_ids.shape) == (1, 2048)
    assert int(batch.sample_starts.sum()) == 16 and len(batch.image_rows) == 16
    assert data.image_seq_length == 20480 == 10 * 2048
    merge = 4  # 2x2 patches -> one LM token
    assert int(batch.image_grid_hw.prod(1).sum()) // merge == data.image_seq_length
    assert load(str(ROOT / "benchmarks" / "configs" / "cpu_small.yaml"), []).data.image_seq_length > 0

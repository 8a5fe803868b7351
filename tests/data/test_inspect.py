"""data/inspect.py and tools/inspect_data.py: counts, skip reasons, formats, token percentiles
and rows that do not fit, read by the training pipeline's own code; the rendering marks exactly
the tokens the loss trains on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from data.helpers import qa_json, solid_png, write_shard_dir

from casa_megatron.data.inspect import TRAINED_CLOSE, TRAINED_OPEN, inspect_sources, render
from casa_megatron.data.processor import ProcessorSettings, SampleProcessor
from casa_megatron.data.sources import SourceSpec

ROOT = Path(__file__).resolve().parents[2]


def _shards(folder):
    long_turns = {"conversation": [{"question": "what colour is the shape ?", "answer": "red"}] * 12}
    samples = {
        "a": {"png": solid_png(56, 56), "json": qa_json()},
        "b": {"png": solid_png(56, 84), "json": qa_json(answer="blue")},
        "broken": {"png": b"not a png", "json": qa_json()},
        "long": {"png": solid_png(56, 56), "json": json.dumps(long_turns).encode()},
        "llava": {"png": solid_png(56, 56), "json": json.dumps({"conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape ?"}, {"from": "gpt", "value": "red"}]}).encode()},
    }
    return write_shard_dir(folder, samples, per_shard=5)


def test_the_report_counts_what_the_pipeline_does(tmp_path, tokenizer_dir):
    shards = _shards(tmp_path / "shards")
    settings = ProcessorSettings(str(tokenizer_dir), seq_length=48, image_seq_length=64, text_layout="layout_tokens")
    processor = SampleProcessor(settings)
    report, = inspect_sources([SourceSpec(str(shards))], processor, samples=10, show=5)
    summary = report.summary()
    assert (summary["samples"], summary["read"], summary["used"]) == (5, 5, 4)
    assert summary["skipped"] == {"corrupt_image": 1} and "broken" in summary["first_skipped"][0]
    assert summary["formats"] == {"ours": 4, "llava": 1}  # the broken one is parsed before its image fails
    assert summary["truncated"] == 1  # "long": 12 turns do not fit 48 text tokens, cut at a turn boundary
    assert summary["text_tokens_max"] > 48 and report.image_tokens[:2] == [4, 6]  # 56x56 px: 2x2 merged, 56x84: 2x3
    # the rendering marks the answer and the end of its turn, nothing of the prompt
    shown = report.shown[0]
    assert shown.startswith("a:\n") and f"{TRAINED_OPEN}red <eot>{TRAINED_CLOSE}" in shown
    assert shown.count(TRAINED_OPEN) == 1 and "what colour is the shape ?" in shown.split(TRAINED_OPEN)[0]


def test_render_marks_the_positions_the_loss_mask_trains():
    from casa_megatron.data.records import TokenizedSample

    class Words:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    # loss at t predicts token t + 1: tokens 3 and 4 are trained
    sample = TokenizedSample("k", [0, 1, 2, 3, 4, 5], [0, 0, 3, 4, 0, 0], [0, 0, 1, 1, 0, 0], [])
    assert render(sample, Words()) == f"w0 w1 w2{TRAINED_OPEN}w3 w4{TRAINED_CLOSE}w5"


def test_the_tool_runs_on_a_config(tmp_path, tokenizer_dir, capsys):
    shards = _shards(tmp_path / "shards")
    spec = importlib.util.spec_from_file_location("inspect_data", ROOT / "tools/inspect_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "report.json"
    assert tool.main([str(ROOT / "configs/tiny_cpu.yaml"), f"data.source={shards}", f"data.tokenizer_path={tokenizer_dir}",
                      "--samples", "5", "--show", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "read 5, used 4, skipped 1 {'corrupt_image': 1}" in text and TRAINED_OPEN in text
    assert json.loads(out.read_text())["sources"][0]["used"] == 4
    assert tool.main([str(ROOT / "configs/tiny_cpu.yaml"), "data.source=synthetic"]) == 2
    assert "nothing to inspect" in capsys.readouterr().err

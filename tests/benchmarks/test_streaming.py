"""benchmarks/streaming.py on a few frames: both fusions share the weights, CASA's cache grows by
exactly the text formula per frame, insertion's by text + image tokens; JSON and plot written."""

from __future__ import annotations

import json

import pytest
import torch


def test_insertion_shares_casa_weights():
    from benchmarks.streaming import PRESETS, build_models

    casa, insertion = build_models(PRESETS["cpu_tiny"], "casa"), build_models(PRESETS["cpu_tiny"], "insertion")
    shared = insertion.state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in casa.state_dict().items() if ".casa_" not in k)
    assert any(".casa_attn." in k for k in casa.state_dict()) and not any(".casa_" in k for k in shared)


def test_streaming_benchmark_small(tmp_path):
    from benchmarks.streaming import main

    out = tmp_path / "streaming.json"
    result = main(["--frames", "6", "--tokens", "3", "--json", str(out)])
    rows = {r["fusion"]: r for r in json.loads(out.read_text())["summary"]}
    casa, insertion = rows["casa"], rows["insertion"]
    # CASA: the whole cache grows by the text cache only (exact byte accounting).
    assert casa["formula_bytes"] == 4 * 4 * 2 * 2 * 64 * 4  # tokens x layers x K,V x kv heads x dim x fp32
    assert casa["cache_slope_bytes"] == pytest.approx(casa["formula_bytes"], rel=1e-9)
    # insertion: every frame's 64 image tokens enter every layer's cache too
    assert insertion["formula_bytes"] == (4 + 64) * 4 * 2 * 2 * 64 * 4
    assert insertion["cache_slope_bytes"] == pytest.approx(insertion["formula_bytes"], rel=1e-9)
    assert len(result["per_frame"]["casa"]) == 6 and out.with_suffix(".png").stat().st_size > 1000

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


def test_a_bounded_context_restarts_and_holds_the_bound(tmp_path):
    """--max-context-tokens: every fusion's cache stays within the bound, restarting as often as
    its turns need (insertion: its 64 image tokens per frame count too)."""
    from benchmarks.streaming import main

    out = tmp_path / "bounded.json"
    main(["--frames", "8", "--tokens", "3", "--json", str(out), "--max-context-tokens", "160"])
    result = json.loads(out.read_text())
    rows = {r["fusion"]: r for r in result["summary"]}
    assert result["max_context_tokens"] == 160 and "restarts" in result["table"]
    for name, row in rows.items():
        frames = result["per_frame"][name]
        assert row["max_cached_tokens"] == max(f["stream_tokens"] for f in frames) <= 160
    # a turn adds 4 text tokens (CASA, text-only: 32 after 8 frames); insertion 4 + 64: two fit in 160
    assert rows["casa"]["restarts"] == rows["text_only"]["restarts"] == 0 and rows["casa"]["max_cached_tokens"] == 32
    assert [(f["stream_tokens"], f["restarted"]) for f in result["per_frame"]["insertion"]] == [
        (68, False), (136, False)] + [(68, True), (136, False)] * 3 and rows["insertion"]["restarts"] == 3


def test_gpu_preset_code_path_runs_on_cpu_at_a_small_shape(tmp_path, monkeypatch):
    """``--preset helium2b_gpu``'s structure (Helium family, the Qwen2.5-VL encoder with frame
    pairs and windows, bf16) at a tiny width, on CPU: the code a GPU session runs, run here first.
    Cache growth is the bf16 text formula for CASA and text + image tokens for insertion."""
    from benchmarks import streaming

    gpu = streaming.PRESETS["helium2b_gpu"]
    small = dict(lm=dict(gpu["lm"], vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(gpu["vision"], depth=2, hidden_size=64, num_heads=2, intermediate_size=96,
                             fullatt_block_indexes=[1]),
                 frame_px=112, dtype=gpu["dtype"])
    monkeypatch.setitem(streaming.PRESETS, "gpu_shape_small", small)
    out = tmp_path / "gpu_shape.json"
    streaming.main(["--preset", "gpu_shape_small", "--frames", "3", "--tokens", "2", "--json", str(out)])
    rows = {r["fusion"]: r for r in json.loads(out.read_text())["summary"]}
    text_bytes = 3 * 2 * 2 * 2 * 32 * 2  # (placeholder + 2 tokens) x layers x K,V x kv heads x head dim x bf16
    assert rows["casa"]["formula_bytes"] == rows["text_only"]["formula_bytes"] == text_bytes
    assert rows["casa"]["cache_slope_bytes"] == pytest.approx(text_bytes, rel=1e-9)
    image_tokens = rows["insertion"]["formula_bytes"] // (2 * 2 * 2 * 32 * 2) - 3
    assert image_tokens == (112 // 14 // 2) ** 2  # one frame pair -> one temporal patch of 4x4 merged tokens
    assert rows["insertion"]["cache_slope_bytes"] == pytest.approx(rows["insertion"]["formula_bytes"], rel=1e-9)


def test_fusions_run_in_separate_calls_with_a_budget_and_spawned_processes(tmp_path):
    """A lent GPU's calls: CASA in one call (spawned process, as on CUDA; its stream stopped by the
    time budget after the minimum 20 frames), insertion and text-only in the next, carried into
    one report through the results store -- insertion's formula needs CASA's image-token count."""
    from benchmarks.streaming import MIN_FRAMES, main

    store, first, second = tmp_path / "store.json", tmp_path / "first.json", tmp_path / "second.json"
    common = ["--frames", "25", "--tokens", "1", "--results-store", str(store), "--budget-s", "0"]
    main(common + ["--fusions", "casa", "--json", str(first), "--start-method", "spawn"])
    rows = {r["fusion"]: r for r in json.loads(first.read_text())["summary"]}
    assert list(rows) == ["casa"] and rows["casa"]["frames"] == MIN_FRAMES and rows["casa"]["frames_asked"] == 25
    assert rows["casa"]["cache_slope_bytes"] == pytest.approx(rows["casa"]["formula_bytes"], rel=1e-9)
    casa_first_call = rows["casa"]

    result = main(common + ["--fusions", "insertion,text_only", "--json", str(second)])
    rows = {r["fusion"]: r for r in json.loads(second.read_text())["summary"]}
    assert list(rows) == ["casa", "insertion", "text_only"]
    assert {k: rows["casa"][k] for k in casa_first_call} == casa_first_call  # kept, not re-measured
    assert rows["insertion"]["formula_bytes"] == (2 + 64) * 4 * 2 * 2 * 64 * 4  # (placeholder + 1 token + 64 image)
    assert rows["insertion"]["cache_slope_bytes"] == pytest.approx(rows["insertion"]["formula_bytes"], rel=1e-9)
    assert "vision_cpu_ms_first10" in rows["casa"] and len(result["per_frame"]["casa"]) == MIN_FRAMES
    assert json.loads(store.read_text())["summary"] == json.loads(second.read_text())["summary"]

    with pytest.raises(SystemExit, match="not 'cpu_tiny' with 2"):
        main(["--frames", "25", "--tokens", "2", "--results-store", str(store), "--fusions", "casa"])
    with pytest.raises(SystemExit):
        main(["--fusions", "casa,nothing"])


def test_total_budget_shares_the_time_and_names_the_fusions_it_could_not_run(tmp_path):
    """``--total-budget-s`` (tools/gpu/round.sh's stream round): a fusion gets its share of what is
    left; with nothing left it is not run, and the JSON says so instead of a run cut by the tool."""
    from benchmarks.streaming import main

    out = tmp_path / "s.json"
    main(["--frames", "25", "--tokens", "1", "--json", str(out), "--total-budget-s", "0"])
    result = json.loads(out.read_text())
    assert result["summary"] == [] and result["not_run"] == ["casa", "insertion", "text_only"]
    assert result["total_budget_s"] == 0

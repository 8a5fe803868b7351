"""benchmarks/export_hf.py on its small preset: a training checkpoint written by a child, exported
by another, the peak RSS of the export process measured; JSON and plot written."""

from __future__ import annotations

import json


def test_export_benchmark_small(tmp_path):
    from benchmarks.export_hf import main

    out = tmp_path / "export.json"
    assert main(["--preset", "small", "--json", str(out), "--plot", str(tmp_path / "rss.png"),
                 "--workdir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"]["parameters"] > 1e5 and result["rss_samples"]
    assert 0.1 < result["peak_rss_gib"] < 2.0  # the interpreter; the model is < 1 MiB
    assert "model.safetensors" in result["output_files"] and "config.json" in result["output_files"]
    assert [name.split(" ")[0] for _, name in result["phases"]] == ["building", "writing", "done"]
    assert (tmp_path / "rss.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("export_hf_")]  # work folder removed

"""benchmarks/gpu_check.py on CPU: the parts that can run here run (the torch kernel against the
float32 reference, DALI's CPU decoder against PyAV when DALI is installed), every GPU part says
"not available" with its reason, and the report lands between the markers of an existing file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the GPU check")
def test_cpu_run_reports_every_part(tmp_path):
    from benchmarks.gpu_check import BEGIN, END, main
    from casa_megatron.data.video.dali import dali_available

    out = tmp_path / "gpu.md"
    out.write_text(f"# Guide\n\nhand-written text\n\n{BEGIN}\nold report\n{END}\n\n## After\n")
    assert main(["--out", str(out), "--quick", "--parts", "abcdef"]) == 0
    text = out.read_text()
    assert text.startswith("# Guide\n\nhand-written text\n\n") and text.endswith("\n## After\n")
    assert "old report" not in text and text.count(BEGIN) == text.count(END) == 1
    report = json.loads(out.with_suffix(".json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert sorted(parts) == list("abcdef")
    kernels = parts["a"]
    assert kernels["status"] == "ok"
    rows = kernels["data"]["rows"]
    assert {(r["kernel"], r["pattern"]) for r in rows} == {
        ("torch", p) for p in ("casa", "cross_attention", "self_attention")}
    assert all(0 < r["max_err"] <= kernels["data"]["tolerance"] for r in rows)  # bf16 vs fp32: not exact
    assert set(kernels["data"]["not_available"]) == {"flash", "te", "torch_varlen"}
    for p in "bcef":
        assert parts[p]["status"] == "not available" and "CUDA GPU" in parts[p]["reason"]
    if dali_available():
        dali = parts["d"]
        assert dali["status"] == "ok" and all(r["same_indices"] for r in dali["data"]["rows"])
        assert all(r["mean_abs_err"] < 8 for r in dali["data"]["rows"])
    else:
        assert parts["d"]["status"] == "not available"
    assert "| torch | casa |" in text and "not available" in text


def test_bad_parts_argument_is_refused(tmp_path):
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.md"), "--parts", "az"])


def test_te_names_map_to_local_names():
    from benchmarks.gpu_parts.models import local_name_for

    local = {"decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
             "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.input_layernorm.weight"}
    assert local_name_for("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", local) == \
        "decoder.layers.0.input_layernorm.weight"
    assert local_name_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", local) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert local_name_for("decoder.layers.1.input_layernorm.weight", local) == "decoder.layers.1.input_layernorm.weight"
    with pytest.raises(KeyError, match="no local-spec counterpart"):
        local_name_for("decoder.layers.0.self_attention.core_attention.weight", local)

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
    assert main(["--out", str(out), "--quick", "--parts", "abcdefg"]) == 0
    text = out.read_text()
    assert text.startswith("# Guide\n\nhand-written text\n\n") and text.endswith("\n## After\n")
    assert "old report" not in text and text.count(BEGIN) == text.count(END) == 1
    report = json.loads(out.with_suffix(".json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert sorted(parts) == list("abcdefg")
    kernels = parts["a"]
    assert kernels["status"] == "ok"
    rows = kernels["data"]["rows"]
    assert {(r["kernel"], r["pattern"]) for r in rows} == {
        ("torch", p) for p in ("casa", "cross_attention", "self_attention")}
    assert all(0 < r["max_err"] <= kernels["data"]["tolerance"] for r in rows)  # bf16 vs fp32: not exact
    assert set(kernels["data"]["not_available"]) == {"flash", "te", "torch_varlen"}
    for p in "bcefg":
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


def _compare_local_specs(rank, world, case):
    from benchmarks.gpu_parts.models import compare_specs, spec_model_config

    return compare_specs(spec_model_config(case), ("local", "local"), device="cpu")


@pytest.mark.parametrize("case", ["casa", "casa + LoRA (frozen LM, rank 8)", "casa + DoRA (frozen LM, rank 8)"])
def test_part_b_comparison_runs_on_the_cpu(case):
    """Part (b)'s code, local spec against itself on the CPU in bf16: every parameter maps, the
    copies make the two models equal, and the LoRA / DoRA case's adapters act and get gradients."""
    from support.dist import run_distributed

    d, = run_distributed(_compare_local_specs, world_size=1, case=case)
    assert d["loss_rel_err"] == d["logits_rel_err"] == d["max_grad_rel_err"] == 0.0
    if "LoRA" in case:
        assert d["adapters"] == 16 and d["params_compared"] > 32  # 4 layers x 4 linears, A and B each
    elif "DoRA" in case:
        assert d["adapters"] == 16 and d["params_compared"] > 48  # ... and each magnitude
    else:
        assert d["adapters"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal is for machines without a GPU")
def test_cpu_rehearsal_runs_the_gpu_parts_code(tmp_path):
    """--rehearse-cpu runs parts (c), (e), (f), (g) -- GPU-only in a real check -- on the CPU at a small
    shape in bf16, one after the other in one process, as a GPU session would: a bug in their glue
    (device moves, the per-fusion child processes after an in-process run, the report) shows up
    here. It found two: VLMBatch has no .cuda(), and the children inherited MASTER_PORT."""
    import subprocess

    out = tmp_path / "rehearsal.md"
    # its own interpreter, as a user runs it: parts (c) and (f) initialise torch.distributed
    # in-process, which later tests' forked gloo workers must not inherit (tests/support/dist.py),
    # and a fork of this process could hang in the OpenMP pool earlier tests started
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--rehearse-cpu", "--quick",
                           "--parts", "cefg", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text().startswith("<!-- gpu_check:begin -->\n**CPU rehearsal**")
    parts = {p["part"]: p for p in json.loads(out.with_suffix(".json").read_text())["parts"]}
    assert {p: parts[p]["status"] for p in "cefg"} == {"c": "ok", "e": "ok", "f": "ok", "g": "ok"}

    steps = parts["c"]["data"]
    assert steps["spec"] == "local" and steps["device"] == "cpu" and "CUDA GPU" in steps["fp8_not_available"]
    (bf16,) = steps["rows"]
    assert bf16["precision"] == "bf16" and 0 < bf16["last_loss"] < bf16["first_loss"] + 1.0

    runs = {r["fusion"]: r for r in parts["e"]["data"]["results"]}
    assert set(runs) == {"casa", "cross_attention", "insertion"} and not any("error" in r for r in runs.values())
    assert "dtype=bfloat16" in parts["e"]["data"]["overrides"]
    assert runs["insertion"]["memory_vs_insertion"] == 1.0 and runs["casa"]["text_tokens_per_s"] > 0

    mfu = parts["f"]["data"]
    assert mfu["flops"]["gemm"] > 0 and mfu["flops"]["attention"] > 0 and mfu["datasheet_peak"] is None
    # the analytic count the loop logs is torch's counter on the real bf16 step (the rehearsal's shape)
    assert mfu["flops"]["gemm"] == mfu["flops"]["gemm_counter"] and mfu["flops"]["gemm_counter_matches"]
    (row,) = mfu["rows"]
    assert row["spec"] == "local" and row["step_time_s"] > 0 and row["mfu_datasheet"] is None
    assert 0 < row["mfu_measured_gemm"]
    profile = mfu["profile"]  # where the step's time went: the GEMMs lead on any device
    ms = [o["ms"] for o in profile["ops"]]
    assert profile["clock"] == "cpu" and ms == sorted(ms, reverse=True) and 0 < sum(o["share"] for o in profile["ops"]) <= 1
    assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::bmm") for o in profile["ops"][:5])
    assert "Profile of one local-spec step (cpu time" in parts["f"]["markdown"]

    saves = {r["mode"]: r for r in parts["g"]["data"]["results"]}  # the loop in bf16, after (c) and (f) ran
    assert set(saves) == {"sync", "async"} and all(r["identical_to_sync"] for r in saves.values())
    assert saves["sync"]["final_loss"] == saves["async"]["final_loss"] and saves["async"]["saves_timed"] == 2
    assert "precision.bf16=true" in parts["g"]["markdown"]


def test_report_is_rewritten_after_every_part_and_the_store_carries_parts_across_runs(tmp_path, monkeypatch):
    """A lent GPU's command dies at its time limit: what finished must already be on disk, the
    rest marked pending. And docs/gpu.md's sequence measures parts before and after Transformer
    Engine is installed, in two runs: the second report holds both, the first run's parts named
    as measured by it."""
    import benchmarks.gpu_check as gpu_check
    from benchmarks.gpu_parts.common import PartResult

    store, out = tmp_path / "store.json", tmp_path / "first.md"
    seen_during_c = {}
    real_run_part = gpu_check.run_part

    def run_part(part, args):
        if part == "c":  # the files as a kill at this moment would leave them
            seen_during_c.update({p["part"]: p["status"] for p in json.loads(out.with_suffix(".json").read_text())["parts"]})
            seen_during_c["md"] = out.read_text()
            return PartResult("c", gpu_check.TITLES["c"], status="failed", reason="RuntimeError: boom")
        return real_run_part(part, args)

    monkeypatch.setattr(gpu_check, "run_part", run_part)
    assert gpu_check.main(["--out", str(out), "--parts", "bce", "--results-store", str(store)]) == 1  # c failed
    assert {k: seen_during_c[k] for k in "bce"} == {"b": "not available", "c": "pending", "e": "pending"}
    assert "**Status: pending**" in seen_during_c["md"] and "**Status: not available**" in seen_during_c["md"]
    first = {p["part"]: p for p in json.loads(store.read_text())["parts"]}
    assert {p: first[p]["status"] for p in "bce"} == {"b": "not available", "c": "failed", "e": "not available"}

    second = tmp_path / "second.md"
    assert gpu_check.main(["--out", str(second), "--parts", "c", "--results-store", str(store)]) == 1
    report = {p["part"]: p for p in json.loads(second.with_suffix(".json").read_text())["parts"]}
    assert sorted(report) == list("bce") and report == {p["part"]: p for p in json.loads(store.read_text())["parts"]}
    assert report["b"] == first["b"] and report["c"]["measured_by"]["command"].endswith("--parts c --results-store "
                                                                                         + str(store))
    text = second.read_text()
    assert text.count("_Measured by an earlier run: `python benchmarks/gpu_check.py --out") == 2  # b and e, not c

    store.write_text("{not json")
    with pytest.raises(SystemExit, match="not a gpu_check JSON"):
        gpu_check.main(["--out", str(second), "--parts", "b", "--results-store", str(store)])


def test_budget_keeps_the_given_order_and_reports_parts_that_no_longer_fit(tmp_path, monkeypatch):
    """``--budget-s`` (tools/gpu/round.sh): parts run in the order asked (the most valuable first);
    a part with less time left than it needs is reported "not run" with the seconds left, never
    started to be killed mid-way; an earlier round's result of it stays in the report instead."""
    import benchmarks.gpu_check as gpu_check
    from benchmarks.gpu_parts.common import PartResult

    ran = []

    def runner(part, args):
        def run():
            ran.append(part)
            return PartResult(part, gpu_check.TITLES[part], data={"deadline_set": args.deadline is not None})
        return run

    monkeypatch.setattr(gpu_check, "_runner", runner)
    monkeypatch.setattr(gpu_check, "PART_MIN_S", {**gpu_check.PART_MIN_S, "a": 1, "d": 1, "e": 10_000})
    store, out = tmp_path / "store.json", tmp_path / "r.md"
    assert gpu_check.main(["--out", str(out), "--parts", "dae", "--budget-s", "600", "--results-store", str(store)]) == 0
    assert ran == ["d", "a"]
    parts = {p["part"]: p for p in json.loads(out.with_suffix(".json").read_text())["parts"]}
    assert parts["e"]["status"] == "not run" and "needs about 10000 s" in parts["e"]["reason"]
    assert parts["a"]["data"] == {"deadline_set": True} and parts["d"]["status"] == "ok"

    # an earlier round measured (e): a later run that cannot fit it shows that measurement, kept
    record = json.loads(store.read_text())
    for p in record["parts"]:
        if p["part"] == "e":
            p.update(status="ok", reason="", data={"from": "round core"}, measured_by={"command": "round core"})
    store.write_text(json.dumps(record))
    ran.clear()
    assert gpu_check.main(["--out", str(out), "--parts", "ea", "--budget-s", "600", "--results-store", str(store)]) == 0
    parts = {p["part"]: p for p in json.loads(out.with_suffix(".json").read_text())["parts"]}
    assert ran == ["a"] and parts["e"]["data"] == {"from": "round core"} and parts["e"]["status"] == "ok"
    assert "_Measured by an earlier run: `round core`" in out.read_text()


def test_fusion_processes_share_what_is_left_of_the_budget():
    from benchmarks.gpu_parts.efficiency import FUSION_MIN_S, FUSION_TIMEOUT_S, fusion_timeouts

    assert fusion_timeouts(3, None, 0.0) == FUSION_TIMEOUT_S
    assert fusion_timeouts(3, 10_000.0, 0.0) == FUSION_TIMEOUT_S  # capped: a hang must not eat the call
    assert fusion_timeouts(3, 300.0, 0.0) == 100.0 and fusion_timeouts(1, 300.0, 240.0) == 60.0
    assert fusion_timeouts(2, 2 * FUSION_MIN_S - 1, 0.0) is None  # too little left to start a build

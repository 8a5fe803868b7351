"""Parts (e) and (f): the fusions at the paper's shape, and the CASA model's MFU.

(e) ``benchmarks/train_efficiency.py`` at ``gpu_paper.yaml`` (Helium-2B shape, bf16, 2,048 text
and 20,480 image tokens per step), one fresh process per fusion (so peak memory is each
fusion's own; a fusion that runs out of memory is reported as such, the others still run).
Targets: CASA / insertion peak memory <= 0.5, text tokens/s >= 1.1.

(f) MFU of the CASA model in bf16 at that shape. Model FLOPs of what runs, by the count the
training loop logs (``casa_megatron/training/flops.py``: GEMMs from the config and the batch,
attention from its cu_seqlens), cross-checked against PyTorch's FLOP counter on one real
training step of the local-spec model (``benchmarks/flops.py``). Step time: median of timed steps of the same model
(and of the TE-spec model when Transformer Engine imports; the FLOPs are the same computation).
MFU against the datasheet dense bf16 peak (``training/throughput.py``: 989.4 TFLOP/s for H100 /
H200 SXM) and against the
bf16 GEMM rate measured here (8192^3, random data). One more step of the local-spec model runs
under ``torch.profiler``: the operators with the most device time (CPU time in a rehearsal) go
into the report, so a round that misses the MFU target already says where the step's time went,
without spending another lent session on profiling.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.gpu_parts.common import PartResult, median, part_device, reset_peak_memory, target, time_it

ROOT = Path(__file__).resolve().parents[2]


FUSION_TIMEOUT_S = 300  # one fusion's process (build, warm-up, timed steps); a hang must not eat the call
FUSION_MIN_S = 30  # with less left before the deadline a fusion's process is not started


def fusion_timeouts(fusions_left: int, deadline: Optional[float], now: float) -> Optional[float]:
    """Seconds the next fusion's process may run: FUSION_TIMEOUT_S, or an equal share of what is
    left before ``deadline`` (``time.monotonic()``); None when too little is left to start one."""
    if deadline is None:
        return FUSION_TIMEOUT_S
    share = (deadline - now) / max(fusions_left, 1)
    return min(FUSION_TIMEOUT_S, share) if share >= FUSION_MIN_S else None


def _fusion_process(config: str, fusion: str, overrides, timeout_s: float = FUSION_TIMEOUT_S) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_efficiency.py"), "--config", config,
               "--child", fusion, "--child-json", str(out), *overrides]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"fusion": fusion, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode or not out.exists():
            tail = proc.stderr[-1500:]
            return {"fusion": fusion, "error": "out of memory" if "OutOfMemory" in tail else tail}
        return json.loads(out.read_text())


def paper_efficiency(config: str, quick: bool = False, rehearse: bool = False,
                     deadline: Optional[float] = None) -> PartResult:
    part_device(rehearse, "the paper-shape efficiency benchmark")  # the children pick the same device
    from benchmarks.train_efficiency import summarize

    result = PartResult("e", "Training efficiency at the paper's shape (gpu_paper.yaml)")
    overrides = ["steps=2", "warmup_steps=1"] if quick else []
    if rehearse:
        overrides.append("dtype=bfloat16")  # the paper shape runs in bf16: rehearse that path
    fusions = ("casa", "insertion", "cross_attention")  # the targets' pair first: a short budget keeps them
    runs = []
    for k, fusion in enumerate(fusions):
        timeout = fusion_timeouts(len(fusions) - k, deadline, time.monotonic())
        runs.append(_fusion_process(config, fusion, overrides, timeout) if timeout is not None else
                    {"fusion": fusion, "error": f"not run: under {FUSION_MIN_S} s of the budget left"})
    ok = [r for r in runs if "error" not in r]
    summarize(ok)
    casa = next((r for r in ok if r["fusion"] == "casa"), {})
    result.data = {"results": runs, "config": config, "overrides": overrides}
    result.targets = {"CASA / insertion peak memory": target(casa.get("memory_vs_insertion"), 0.5, "max"),
                      "CASA / insertion text tokens/s": target(casa.get("throughput_vs_insertion"), 1.1, "min")}
    lines = ["| fusion | peak memory (GiB) | step (s) | text tokens/s | images/s | memory vs insertion | "
             "tokens/s vs insertion |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['fusion']} | {r['error'][:60]} | | | | | |")
            continue
        mem = r["peak_memory_bytes"] / 2**30
        lines.append(f"| {r['fusion']} | {mem:.1f} | {r['step_time_s']:.3f} | {r['text_tokens_per_s']:.0f} | "
                     f"{r['images_per_s']:.2f} | {r.get('memory_vs_insertion', float('nan')):.3f} | "
                     f"{r.get('throughput_vs_insertion', float('nan')):.3f} |")
    memory = ("torch.cuda.max_memory_allocated (weights, grads, optimizer states, activations)" if not rehearse
              else "peak RSS growth (CPU rehearsal)")
    result.markdown = (f"`{config}` {' '.join(overrides)}: each fusion in its own process; memory = {memory}.\n\n"
                       + "\n".join(lines))
    if any("error" in r and r["error"] != "out of memory" and not r["error"].startswith("not run") for r in runs):
        result.status, result.reason = "failed", "a fusion's process failed (see the table)"
    return result


def gemm_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 GEMM FLOP/s on random data (the ceiling MFU is also reported against)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / median(time_it(lambda: a @ b, repeats))


PROFILE_TOP = 15  # operators listed by device time in part (f)'s profile


def profile_step(step, device: torch.device, top: int = PROFILE_TOP) -> dict:
    """One ``step()`` under torch.profiler: the ``top`` operators by self device time (CUDA) or
    self CPU time (a CPU rehearsal), each with its share of the step's total. A profiler that
    fails is reported, never fatal: the MFU it accompanies is already measured."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(device)
        events = prof.key_averages()
    except Exception as exc:  # noqa: BLE001 - an optional breakdown
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = [(e.key, getattr(e, key, 0.0) or 0.0, e.count) for e in events]
    total = sum(t for _, t, _ in timed) or 1.0
    rows = sorted(timed, key=lambda r: -r[1])[:top]
    return {"clock": "device" if cuda else "cpu", "total_ms": total / 1e3,
            "ops": [{"op": name, "ms": t / 1e3, "share": t / total, "calls": n} for name, t, n in rows]}


def mfu(config: str, quick: bool = False, rehearse: bool = False) -> PartResult:
    device = part_device(rehearse, "MFU")
    from benchmarks.common import build_model, counted_model_config, image_heavy_batch, train_step
    from benchmarks.flops import step_flops
    from benchmarks.train_efficiency import load
    from casa_megatron.training.throughput import datasheet_peak_tflops

    result = PartResult("f", "MFU of the CASA model in bf16")
    cfg = load(config, ["steps=2", "warmup_steps=1"] if quick else [])
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    data = cfg.data
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal)"
    peak = datasheet_peak_tflops(gpu, "bf16") if device.type == "cuda" else None
    peak = peak * 1e12 if peak else None  # FLOP/s
    measured_peak = gemm_rate(device, n=8192 if device.type == "cuda" else 512, repeats=10 if not quick else 3)
    impls = ["local"]
    try:
        if device.type == "cuda":
            import transformer_engine.pytorch  # noqa: F401
            impls.append("transformer_engine")
    except Exception:  # noqa: BLE001 - the TE row is optional
        pass
    rows, flops = [], None
    for impl in impls:
        reset_peak_memory(device)
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, transformer_impl=impl))
        model = build_model(run_cfg, "casa", data.image_seq_length)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        batches = [image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed + k).to(device)
                   for k in range(data.num_microbatches)]
        seq = data.seq_length + data.image_seq_length
        step = lambda: train_step(model, optimizer, batches, seq, data.micro_batch_size)  # noqa: E731
        if flops is None:  # counted on the local spec: every GEMM is a torch matmul there
            flops = step_flops(counted_model_config(run_cfg, "casa"), batches, data.image_seq_length, step)
        seconds = median(time_it(step, cfg.steps, warmup=cfg.warmup_steps))
        if impl == "local":
            profile = profile_step(step, device)
        rows.append({"spec": impl, "step_time_s": seconds, "tflops_per_s": flops["total"] / seconds / 1e12,
                     "mfu_datasheet": flops["total"] / seconds / peak if peak else None,
                     "mfu_measured_gemm": flops["total"] / seconds / measured_peak})
        model = optimizer = None  # freed before the next build
    best = max(r["mfu_datasheet"] or 0 for r in rows) if peak else None
    result.data = {"flops": flops, "rows": rows, "datasheet_peak": peak, "measured_gemm_peak": measured_peak,
                   "gpu": gpu, "config": config, "profile": profile}
    result.targets = {"CASA bf16 MFU (datasheet peak)": target(best, 0.40, "min")}
    lines = ["| spec | step (s) | TFLOP/s | MFU (datasheet) | MFU (measured GEMM peak) |", "|---|---|---|---|---|"]
    for r in rows:
        ds = f"{r['mfu_datasheet']:.3f}" if r["mfu_datasheet"] is not None else "n/a"
        lines.append(f"| {r['spec']} | {r['step_time_s']:.3f} | {r['tflops_per_s']:.3g} | {ds} | "
                     f"{r['mfu_measured_gemm']:.3f} |")
    check = "equal" if flops["gemm_counter_matches"] else f"{flops['gemm_counter'] / 1e12:.4g} TFLOP"
    result.markdown = (f"FLOPs per step: {flops['total'] / 1e12:.3g} TFLOP = GEMMs {flops['gemm'] / 1e12:.3g} "
                       f"(analytic, casa_megatron/training/flops.py; FlopCounterMode on one real step: {check}) "
                       f"+ attention {flops['attention'] / 1e12:.3g} "
                       f"({flops['attention_pairs']:,} visible query-key pairs). Peak: datasheet "
                       + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a")
                       + f", measured bf16 GEMM {measured_peak / 1e12:.3g} TFLOP/s ({gpu}).\n\n" + "\n".join(lines)
                       + "\n\n" + _profile_markdown(profile))
    return result


def _profile_markdown(profile: dict) -> str:
    if "error" in profile:
        return f"Profile of one local-spec step: not taken ({profile['error']})."
    lines = [f"Profile of one local-spec step ({profile['clock']} time, {profile['total_ms']:.1f} ms in operators; "
             f"top {len(profile['ops'])} by self time):", "", "| operator | ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{o['op'][:70]}` | {o['ms']:.2f} | {o['share']:.1%} | {o['calls']} |" for o in profile["ops"]]
    return "\n".join(lines)

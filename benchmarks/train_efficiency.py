"""Training efficiency of the fusions on the same backbone: peak memory, step time, text tokens/s
and images/s on image-heavy packed sequences (the paper's ~10 image tokens per text token).

    python benchmarks/train_efficiency.py --config benchmarks/configs/cpu_small.yaml --json OUT.json [key=value ...]

Each fusion is measured in its own process (a fresh interpreter by default; ``--launcher fork``
forks this one after importing megatron-core, which saves ~5 s per fusion), so peak memory is
never inherited from another fusion. Memory: on GPU ``torch.cuda.max_memory_allocated`` over the
timed steps (everything: weights, grads, optimizer states, activations); on CPU the peak RSS of
one training step minus the RSS right before it (activations, gradients and temporaries -- see
``common.CpuPeakRss``). The JSON says which in every result's ``memory_method``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `casa_megatron` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BenchConfig, CpuPeakRss, build_model, format_table, image_heavy_batch, machine_info, run_in_child,
    state_bytes, train_step,
)

# Targets of the issue, at the paper's token ratio: CASA vs insertion.
TARGETS = {"peak_memory_ratio_max": 0.55, "text_tokens_per_s_ratio_min": 1.0}
GPU_METHOD = ("gpu: torch.cuda.max_memory_allocated over the timed steps (weights, grads, "
              "optimizer states and activations)")


def load(config_path: str, overrides) -> BenchConfig:
    from casa_megatron.config import load_config

    return load_config(BenchConfig, config_path, overrides)


def measure(cfg: BenchConfig, fusion: str) -> dict:
    """Build the model for ``fusion``, warm up, time ``cfg.steps`` steps, then measure memory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = cfg.data
    on_gpu = torch.cuda.is_available()
    model = build_model(cfg, fusion, data.image_seq_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    batches = [image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed + k).to(device)
               for k in range(data.num_microbatches)]

    def step() -> float:
        return train_step(model, optimizer, batches, data.seq_length + data.image_seq_length,
                          data.micro_batch_size)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(cfg.warmup_steps):
        step()
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(cfg.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    if on_gpu:
        peak, method = torch.cuda.max_memory_allocated(), GPU_METHOD
    else:
        with CpuPeakRss() as probe:
            step()
        peak, method = probe.bytes, CpuPeakRss.method
    step_time = statistics.median(times)
    rows = data.num_microbatches * data.micro_batch_size
    text_tokens = rows * data.seq_length
    images = rows * data.samples_per_row * data.images_per_sample
    return {
        "fusion": fusion, "peak_memory_bytes": peak, "memory_method": method,
        "step_time_s": step_time, "step_times_s": times,
        "text_tokens_per_s": text_tokens / step_time, "images_per_s": images / step_time,
        "image_tokens_per_s": rows * data.image_seq_length / step_time,
        "text_tokens_per_step": text_tokens, "image_tokens_per_step": rows * data.image_seq_length,
        "images_per_step": images, "params": sum(p.numel() for p in model.parameters()),
        "state_bytes": state_bytes(model, optimizer), "loss": loss,
    }


# --- one process per fusion ------------------------------------------------------------------------
def _run_subprocess(config_path: str, overrides, fusion: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", config_path,
               "--child", fusion, "--child-json", str(out), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"{fusion} benchmark process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _run_fork(cfg: BenchConfig, fusion: str) -> dict:
    import megatron.core  # noqa: F401 - imported once, inherited by the forked child

    return run_in_child(measure, cfg, fusion, what=f"{fusion} benchmark")  # spawned where CUDA is


# --- report ----------------------------------------------------------------------------------------
COLUMNS = [("fusion", "fusion", ""), ("peak mem (MiB)", "peak_memory_mib", ".1f"),
           ("step (s)", "step_time_s", ".3f"), ("text tok/s", "text_tokens_per_s", ".1f"),
           ("images/s", "images_per_s", ".2f"), ("image tok/s", "image_tokens_per_s", ".0f"),
           ("params (M)", "params_m", ".2f"), ("mem vs insertion", "memory_vs_insertion", ".3f"),
           ("text tok/s vs insertion", "throughput_vs_insertion", ".3f")]


def summarize(results) -> dict:
    """Add ratios to insertion and check the issue's targets for CASA."""
    base = next((r for r in results if r["fusion"] == "insertion"), None)
    for r in results:
        r["peak_memory_mib"] = r["peak_memory_bytes"] / 2 ** 20 if r["peak_memory_bytes"] is not None else None
        r["params_m"] = r["params"] / 1e6
        if base and base["peak_memory_bytes"] and r["peak_memory_bytes"] is not None:
            r["memory_vs_insertion"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        if base:
            r["throughput_vs_insertion"] = r["text_tokens_per_s"] / base["text_tokens_per_s"]
    casa = next((r for r in results if r["fusion"] == "casa"), None)
    targets = dict(TARGETS)
    if casa and base:
        mem = casa.get("memory_vs_insertion")
        targets["casa_peak_memory_ratio"] = mem
        targets["casa_text_tokens_per_s_ratio"] = casa["throughput_vs_insertion"]
        targets["memory_target_met"] = mem is not None and mem <= TARGETS["peak_memory_ratio_max"]
        targets["throughput_target_met"] = casa["throughput_vs_insertion"] >= TARGETS["text_tokens_per_s_ratio_min"]
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--launcher", choices=("subprocess", "fork"), default="subprocess")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure the fusions round-robin this many times and keep each fusion's "
                             "median run (spreads background load on a shared machine evenly)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    if args.child:
        Path(args.child_json).write_text(json.dumps(measure(cfg, args.child)))
        return 0
    runs = {fusion: [] for fusion in cfg.fusions}
    load_before = _loadavg()
    for round_ in range(args.repeats):
        for fusion in cfg.fusions:
            start = time.perf_counter()
            if args.launcher == "fork":
                runs[fusion].append(_run_fork(cfg, fusion))
            else:
                runs[fusion].append(_run_subprocess(args.config, args.overrides, fusion))
            print(f"{fusion} (round {round_ + 1}/{args.repeats}): done in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    results = [_median_run(runs[fusion]) for fusion in cfg.fusions]
    targets = summarize(results)
    from casa_megatron.config import to_dict

    data = cfg.data
    machine = {**machine_info(), "loadavg_1m_before": load_before, "loadavg_1m_after": _loadavg()}
    report = {"results": results, "targets": targets, "machine": machine, "repeats": args.repeats,
              "config": to_dict(cfg), "config_path": args.config, "launcher": args.launcher,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else None,
              "image_tokens_per_text_token": data.image_seq_length / data.seq_length}
    print(f"image tokens per text token: {report['image_tokens_per_text_token']:.1f}; "
          f"{results[0]['memory_method']}")
    print(format_table(results, COLUMNS))
    if "casa_peak_memory_ratio" in targets:
        print(f"CASA vs insertion: peak memory x{_r(targets['casa_peak_memory_ratio'])} "
              f"(target <= {TARGETS['peak_memory_ratio_max']}), text tokens/s "
              f"x{_r(targets['casa_text_tokens_per_s_ratio'])} (target >= {TARGETS['text_tokens_per_s_ratio_min']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _median_run(runs):
    """The run with the median step time (its memory too); every run's step time is kept."""
    ordered = sorted(runs, key=lambda r: r["step_time_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeat_step_times_s"] = [r["step_time_s"] for r in runs]
    chosen["repeat_peak_memory_bytes"] = [r["peak_memory_bytes"] for r in runs]
    return chosen


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _r(x):
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())

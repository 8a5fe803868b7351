"""Every GPU check of issue 13 in one command; writes a markdown report and its JSON.

    python benchmarks/gpu_check.py [--out docs/gpu.md] [--json PATH] [--parts aefg] [--budget-s S] [--quick]
    python benchmarks/gpu_check.py --rehearse-cpu [--quick]   # the GPU parts' code on a CPU, no GPU figure

Parts (each reports "not available" with the reason when its package or a GPU is missing;
a part that raises is reported "failed" with the error, the others still run):
  (a) every available window-attention kernel (torch, flash-attn, TE, torch varlen) vs the
      float32 torch reference, forward and backward (``gpu_parts/kernels.py``);
  (b) the TE-spec model vs the local-spec model with the same weights, bf16, with and without LoRA
      adapters (TE layers unfused where adapted) (``models.py``);
  (c) bf16 and FP8 (TE recipe) training steps of the CASA model: loss, step time, peak memory;
  (d) DALI decoding vs PyAV on the same clips: pixel error, frames/s (VP9 with DALI's CPU
      operators anywhere, H.264 + the GPU decoder on a GPU) (``dali_decode.py``);
  (e) ``train_efficiency`` at ``benchmarks/configs/gpu_paper.yaml`` (Helium-2B shape, 2,048 text +
      20,480 image tokens): CASA vs cross-attention vs insertion, peak memory, text tokens/s;
  (f) MFU of the CASA model in bf16 at that shape (``efficiency.py``);
  (g) background checkpoint saves (``checkpoint.async_save``) through the real training loop in
      bf16: the same tensors as synchronous saves, and how long saves hold training
      (``checkpoints.py``; megatron's device-to-host copy before the fork is GPU-only code).

How MFU FLOPs are counted (part f): model FLOPs of what actually runs, by the count the training
loop logs (``casa_megatron/training/flops.py``, docs/training.md "Throughput and MFU"): every
GEMM (forward; backward with the weight gradient only where the weight trains, the input
gradient where megatron computes it -- the K/V-only image projection, frozen weights, the
projector and the output layer as executed) plus the attention FLOPs from the micro-batch's own
cu_seqlens: 4 * head_dim * query_heads per visible (query, key) pair forward (QK^T and PV),
twice that backward; visible = causal within each packed sample for self-attention, images + the
causal text of the window for CASA, the window's images for cross-attention, frames / windows
in the vision encoder. Cross-check: ``torch.utils.flop_counter.FlopCounterMode`` counts the
GEMMs of one real step (local spec) beside it (``benchmarks/flops.py``; ``gemm_counter`` in the
JSON; equal unless activations are recomputed). Recomputation (activation and flash-attention
backward) is not counted (model FLOPs, not hardware FLOPs). MFU =
FLOPs / (median step time x peak), against the datasheet's dense bf16 peak and against the
bf16 GEMM rate measured in the same run.

The report goes between ``<!-- gpu_check:begin -->`` and ``<!-- gpu_check:end -->`` in ``--out``
when the file has those markers (docs/gpu.md keeps its hand-written guide around them); else the
file is the report. Writes are atomic. The JSON (default: ``--out`` with ``.json``) holds every
number. Exit status 1 if a part failed, else 0.

Parts run in the order ``--parts`` gives them (most valuable first). Report and JSON are rewritten
after every part, parts still to run marked "pending": a lent GPU's command is killed at its time
limit, and what finished before must come back. ``--budget-s`` is the time this command may take:
a part is not started when less is left than its ``PART_MIN_S`` (reported "not run" with the
seconds left), and part (e) shares what is left among its fusions' processes. ``--results-store
PATH`` carries parts across runs and rounds (docs/gpu.md: the core round measures (a), (e), (f),
(g), the dali round (d), the TE round (b), (c) and TE's rows of (a) and (f), each in another lent
session): parts not measured now are taken from it and reported with the command that measured
them; every part measured now is written into it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `casa_megatron` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_parts.common import NotAvailable, PartResult  # noqa: E402
from casa_megatron.runtime.atomic import atomic_write_text  # noqa: E402

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
TITLES = {
    "a": "Window-attention kernels vs the float32 torch reference",
    "b": "Transformer Engine spec vs local spec, same weights (bf16)",
    "c": "bf16 and FP8 training steps of the CASA model",
    "d": "DALI decoding vs PyAV",
    "e": "Training efficiency at the paper's shape (gpu_paper.yaml)",
    "f": "MFU of the CASA model in bf16",
    "g": "Background checkpoint saves on the GPU",
}


# Rough least durations on a lent H100 (estimates from each part's imports, model builds and
# FLOPs; not measured yet): with less of --budget-s left a part is not started.
PART_MIN_S = {"a": 20, "b": 40, "c": 90, "d": 30, "e": 150, "f": 60, "g": 90}


def seconds_left(args) -> float:
    return float("inf") if args.deadline is None else args.deadline - time.monotonic()


def _runner(part: str, args):
    from benchmarks.gpu_parts import checkpoints, dali_decode, efficiency, kernels, models

    return {
        "a": kernels.run,
        "b": lambda: models.te_vs_local(quick=args.quick),
        "c": lambda: models.precision_steps(args.config, quick=args.quick, rehearse=args.rehearse_cpu),
        "d": lambda: dali_decode.run(quick=args.quick),
        "e": lambda: efficiency.paper_efficiency(args.config, quick=args.quick, rehearse=args.rehearse_cpu,
                                                 deadline=args.deadline),
        "f": lambda: efficiency.mfu(args.config, quick=args.quick, rehearse=args.rehearse_cpu),
        "g": lambda: checkpoints.run(quick=args.quick, rehearse=args.rehearse_cpu, deadline=args.deadline),
    }[part]


def run_part(part: str, args) -> PartResult:
    left = seconds_left(args)
    if left < PART_MIN_S[part]:
        result = PartResult(part, TITLES[part], status="not run",
                            reason=f"{max(left, 0):.0f} s of --budget-s left, the part needs about {PART_MIN_S[part]} s")
        print(f"({part}) {result.title}: not run -- {result.reason}", file=sys.stderr, flush=True)
        return result
    start = time.perf_counter()
    try:
        result = _runner(part, args)()
    except NotAvailable as exc:
        result = PartResult(part, TITLES[part], status="not available", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
        result = PartResult(part, TITLES[part], status="failed", reason=f"{type(exc).__name__}: {exc}",
                            markdown="```\n" + traceback.format_exc()[-3000:] + "\n```")
    result.seconds = time.perf_counter() - start
    print(f"({part}) {result.title}: {result.status}{' -- ' + result.reason if result.reason else ''} "
          f"[{result.seconds:.1f} s]", file=sys.stderr, flush=True)
    return result


def pending(part: str) -> PartResult:
    return PartResult(part, TITLES[part], status="pending",
                      reason="not finished when this report was written (the run was still going, or was cut short)")


UNFINISHED = ("pending", "not run")


def load_store(path: Path) -> dict:
    """Parts an earlier run measured (``--results-store``): part -> its result."""
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())["parts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--results-store {path}: not a gpu_check JSON ({type(exc).__name__}: {exc})") from exc
    stored = {}
    for record in records:
        result = PartResult.from_json(record)
        if result.part in TITLES and result.status not in UNFINISHED:
            stored[result.part] = result
    return stored


def environment() -> dict:
    import platform

    import torch

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpu_count": os.cpu_count()}
    from importlib import metadata

    for dist in ("megatron-core", "transformer-engine", "transformer-engine-torch", "flash-attn",
                 "nvidia-dali-cuda130", "nvidia-dali-cuda120", "av"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    return env


def render(results, env: dict, command: str, kept=frozenset()) -> str:
    """Markdown of ``results``; parts in ``kept`` came from the results store (an earlier run)."""
    lines = [f"_Written by `{command}` on {env['date_utc']} UTC._", "",
             "| | |", "|---|---|",
             f"| GPU | {env['gpu'] or 'none (CPU only: the GPU parts are not available here)'} |",
             f"| torch / CUDA | {env['torch']} / {env['cuda']} |"]
    for dist in ("megatron-core", "transformer-engine", "transformer-engine-torch", "flash-attn",
                 "nvidia-dali-cuda130", "nvidia-dali-cuda120", "av"):
        lines.append(f"| {dist} | {env[dist] or 'not installed'} |")
    targets = [(r.part, name, t) for r in results for name, t in r.targets.items()]
    if targets:
        lines += ["", "Issue 13 targets:", "", "| part | target | value | goal | met |", "|---|---|---|---|---|"]
        for part, name, t in targets:
            value = t["value"] if not isinstance(t["value"], float) else f"{t['value']:.3f}"
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {part} | {name} | {value} | {t['target']} | {met} |")
    for r in results:
        lines += ["", f"### ({r.part}) {r.title}", "",
                  f"**Status: {r.status}**" + (f" — {r.reason}" if r.reason else "") + f" ({r.seconds:.1f} s)"]
        if r.part in kept:
            by = r.measured_by
            lines += ["", f"_Measured by an earlier run: `{by.get('command', '?')}` on {by.get('date_utc', '?')} UTC "
                          f"(torch {by.get('torch')}, transformer-engine {by.get('transformer-engine')}; "
                          "kept from the results store)._"]
        if r.markdown:
            lines += ["", r.markdown]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report_md: str) -> None:
    """Between the markers when ``out`` has them, else the whole file; atomic."""
    text = f"{BEGIN}\n{report_md}{END}\n"
    if out.exists():
        old = out.read_text()
        if BEGIN in old and END in old:
            text = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1:]
    atomic_write_text(out, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="markdown report (default docs/gpu.md; with --rehearse-cpu "
                             "benchmarks/results/gpu_check_cpu_rehearsal.md)")
    parser.add_argument("--json", help="JSON of every number (default: --out with .json)")
    parser.add_argument("--parts", default="".join(TITLES), help="which parts, in the order to run them, e.g. 'aefg'")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds this command may take: parts that no longer fit are reported 'not run'")
    parser.add_argument("--config", default=None,
                        help="the config of parts (c), (e) and (f) (default benchmarks/configs/gpu_paper.yaml; "
                             "with --rehearse-cpu cpu_small.yaml)")
    parser.add_argument("--rehearse-cpu", action="store_true",
                        help="run the GPU-only code of parts (c), (e), (f), (g) on the CPU at a small shape, in bf16 "
                             "where the part is bf16: proves the code runs, measures nothing about a GPU")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run of the structure)")
    parser.add_argument("--results-store", default=None,
                        help="JSON carrying parts across runs: parts not run now are kept from it, parts run now "
                             "are written into it (tools/gpu/device.sh check uses one per lent machine)")
    args = parser.parse_args(argv)
    configs = ROOT / "benchmarks" / "configs"
    args.config = args.config or str(configs / ("cpu_small.yaml" if args.rehearse_cpu else "gpu_paper.yaml"))
    args.out = args.out or str(ROOT / ("benchmarks/results/gpu_check_cpu_rehearsal.md" if args.rehearse_cpu
                                       else "docs/gpu.md"))
    bad = set(args.parts) - set(TITLES)
    if bad or not args.parts:
        parser.error(f"--parts takes letters from {''.join(TITLES)!r}, got {args.parts!r}")
    env = environment()
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.strip()
    now = list(dict.fromkeys(args.parts))  # run order; the report lists parts alphabetically
    args.deadline = time.monotonic() + args.budget_s if args.budget_s is not None else None
    store = Path(args.results_store) if args.results_store else None
    stored = load_store(store) if store else {}
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    done = {}

    def shown(part: str):
        """(result, kept): the part as measured now; else as an earlier run measured it (not asked
        for now, not reached yet, or not run for lack of time); else "not run" / "pending"."""
        if part in done and done[part].status not in UNFINISHED:
            return done[part], False
        if part in stored:
            return stored[part], True
        return done.get(part) or pending(part), False

    def publish() -> None:
        """Report, JSON (and store) as they stand: finished and kept parts, the rest pending."""
        shown_now = {p: shown(p) for p in sorted(set(now) | set(stored))}
        results = [r for r, _ in shown_now.values()]
        report = render(results, env, command, kept={p for p, (_, k) in shown_now.items() if k})
        if args.rehearse_cpu:
            report = ("**CPU rehearsal** (`--rehearse-cpu`): the GPU parts' code ran on the CPU at a small shape; "
                      "no number here describes a GPU.\n\n" + report)
        write_report(out, report)
        record = json.dumps({"environment": env, "command": command, "parts": [r.__dict__ for r in results]},
                            indent=2, default=str)
        atomic_write_text(json_path, record)
        if store:
            atomic_write_text(store, record)

    publish()
    for part in now:
        done[part] = run_part(part, args)
        done[part].measured_by = {"command": command, **env}
        publish()
    results = list(done.values())
    print(f"report: {out}\njson: {json_path}", file=sys.stderr)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

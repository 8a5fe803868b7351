"""Streaming video captioning: CASA vs token insertion, frames arriving one by one.

    python benchmarks/streaming.py --preset cpu_tiny --frames 512 --json benchmarks/results/streaming_cpu_tiny.json

Both models share the backbone, vision tower and weights (same seed; insertion loads CASA's state
dict minus the CASA modules); only the fusion differs. Each turn is the live captioner's protocol
(``casa_megatron.inference.streaming.LiveCaptioner``): the frame opens a window, then exactly
``--tokens`` caption tokens are generated (stop tokens suppressed, the paper's 16 tokens/turn),
the cache persisting across turns. Per turn: latency (frame in -> last token), time to first
token, the turn's CPU time (one thread: its compute, undistorted by other processes on a shared
machine), the cache's exact bytes, and memory (CUDA peak allocated on GPU; process RSS on CPU).
Each fusion runs in its own forked process, after one warm-up turn on a cache that is dropped.

Targets (issue 11) for CASA: mean latency of the last 10 turns / first 10 <= 1.05, and memory
growth per frame = the text cache only: ``tokens_per_turn * n_self_attention_layers * 2 *
kv_heads * head_dim * bytes_per_element`` (one placeholder + the turn's tokens enter the text
cache; CASA windows are replaced, not accumulated). Insertion adds ``image_tokens`` per frame to
every layer's cache; its growth is reported beside.

On a lent GPU (15 device minutes per session): ``--fusions`` runs a subset, ``--results-store``
carries the fusions of earlier calls into this call's report, ``--budget-s`` stops a fusion's
stream in time (the frames reached are reported), ``--total-budget-s`` shares the command's time
among the fusions (each streams for its share of what is left, less the previous fusion's
start-up), and the JSON is rewritten after every fusion. Each fusion's process is forked on CPU
and spawned on CUDA (a forked child cannot use CUDA once the parent has touched it); its model is
built on the device it runs on (a 2.7B-parameter model initialised on a GPU, not on its CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import format_table, run_in_child  # noqa: E402

PRESETS = {
    # CPU: a small LM (all 4 layers CASA-parallel) and the tiny ViT; 224 px frames -> 64 image tokens.
    "cpu_tiny": dict(
        lm=dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
        vision=dict(encoder="tiny_vit", depth=2, hidden_size=128, num_heads=4, intermediate_size=256),
        frame_px=224, dtype="float32"),
    # CPU, weights-bound: a wider GQA LM whose decode cost is dominated by reading its weights (~0.5 GB
    # fp32), as on a GPU at the paper's scale; the text cache after 512 frames is ~14% of the weights.
    "cpu_medium": dict(
        lm=dict(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=2, attention_bias=True),
        vision=dict(encoder="tiny_vit", depth=2, hidden_size=128, num_heads=4, intermediate_size=256),
        frame_px=224, dtype="float32"),
    # GPU (not run here: no GPU was lent): Helium1-2B-shaped LM, Qwen2.5-VL-shaped ViT, 448 px frames.
    "helium2b_gpu": dict(
        lm=dict(vocab_size=64000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, lm_family="helium", rms_norm_eps=1e-8),
        vision=dict(encoder="qwen2_5_vl", depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
        frame_px=448, dtype="bfloat16"),
}


# text_only: the same LM fed the same text without any image -- the cost every text LM pays for its
# growing self-attention cache; CASA's own per-frame cost is CASA minus this.
FUSIONS = ("casa", "insertion", "text_only")


def _config(preset: dict, mechanism: str):
    from casa_megatron.hf.remote.configuration_casa import CasaConfig

    return CasaConfig(**preset["lm"], fusion_mechanism=mechanism, fusion_placement="parallel",
                      vision_config=preset["vision"], image_token_id=4)


def build_models(preset: dict, mechanism: str, seed: int = 0):
    """The CASA model from ``seed``; insertion = the same weights without the CASA modules."""
    from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM

    torch.manual_seed(seed)
    casa = CasaForCausalLM(_config(preset, "casa"))
    if mechanism == "casa":
        return casa
    insertion = CasaForCausalLM(_config(preset, "insertion"))
    missing, unexpected = insertion.load_state_dict(casa.state_dict(), strict=False)
    assert not missing and all(".casa_" in k for k in unexpected), (missing, unexpected)
    return insertion


def _processor(vocab: int, workdir: Path, preset: dict):
    from casa_megatron.data.tokenization import build_word_tokenizer
    from casa_megatron.hf.remote.processing_casa import CasaProcessor
    from transformers import AutoTokenizer

    tok_dir = build_word_tokenizer([" ".join(f"w{i}" for i in range(vocab - 7))], workdir / "tok")
    px = preset["frame_px"]
    return CasaProcessor(AutoTokenizer.from_pretrained(str(tok_dir)), encoder=preset["vision"]["encoder"],
                         max_pixels=px * px, video_max_pixels=px * px,
                         temporal_patch_size=preset["vision"].get("temporal_patch_size", 1))


MIN_FRAMES = 20  # a time budget never stops a fusion before this: first 10 vs last 10 turns
STARTUP_GUESS_S = 60.0  # a fusion's process on a GPU before its first frame (spawn, imports, build): a guess


def _run_fusion(mechanism: str, preset_name: str, frames: int, tokens: int, threads: int, device: str,
                budget_s: Optional[float] = None, max_context_tokens: Optional[int] = None):
    """One fusion in a fresh process -> per-turn records. ``budget_s``: stop streaming after this
    many seconds (at least MIN_FRAMES frames), so a lent GPU's 10-minute call still returns;
    ``max_context_tokens``: the captioner's bound on its self-attention cache (restarts)."""
    import ctypes
    import gc

    from casa_megatron.inference.streaming import LiveCaptioner

    entered = time.monotonic()
    torch.set_num_threads(threads)
    preset = PRESETS[preset_name]
    dtype = getattr(torch, preset["dtype"])
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of minutes on its CPU
        model = build_models(preset, "insertion" if mechanism == "text_only" else mechanism)
    model = model.to(dtype=dtype).eval()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        processor = _processor(model.config.vocab_size, Path(tmp), preset)
    captioner = LiveCaptioner(model, processor, max_new_tokens=tokens, force_tokens=True,
                              use_images=mechanism != "text_only", max_context_tokens=max_context_tokens)
    rng = np.random.default_rng(0)
    px = preset["frame_px"]
    captioner.caption_frame(rng.integers(0, 256, (px, px, 3), dtype=np.uint8), 0.0)  # warm-up
    captioner.reset()
    records = []
    start = time.monotonic()
    startup_s = start - entered
    for k in range(frames):
        frame = rng.integers(0, 256, (px, px, 3), dtype=np.uint8)
        records.append(captioner.caption_frame(frame, k / 2).to_json())
        if budget_s is not None and k + 1 >= MIN_FRAMES and time.monotonic() - start > budget_s:
            break
    cfg = model.config
    sa_layers = sum(1 for i in range(cfg.num_hidden_layers)
                    if not (i in cfg.fusion_layers and cfg.fusion_placement == "replace"))
    return {"records": records, "sa_layers": sa_layers, "frames_asked": frames, "startup_s": startup_s,
            "bytes_per_token_layer": 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8,
            "image_tokens": int(captioner.cache.rows[0].windows[cfg.fusion_layers[0]].num_image_tokens)
            if cfg.fusion_layers else None}


def slope(values) -> float:
    """Least-squares growth per frame."""
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, dtype=np.float64), 1)[0]) if len(values) > 1 else 0.0


def summarise(name: str, out: dict, tokens: int, casa_image_tokens: Optional[int]) -> dict:
    """``casa_image_tokens``: image tokens per frame, from the CASA run (insertion has no window to
    read it from); None without a CASA run, and then insertion's formula is unknown."""
    recs = out["records"]
    turn = [r["turn_s"] for r in recs]
    cpu = [r["turn_cpu_s"] for r in recs]
    cache = [sum(r["cache_bytes"].values()) for r in recs]
    text_per_turn = tokens + 1  # the frame's placeholder + its tokens (the last enters with the next frame)
    inserted = casa_image_tokens if name == "insertion" else 0
    formula = None if inserted is None else (text_per_turn + inserted) * out["sa_layers"] * out["bytes_per_token_layer"]
    n = min(10, len(recs) // 2) or 1
    return {
        "fusion": name, "frames": len(recs), "frames_asked": out.get("frames_asked", len(recs)),
        "first10_turn_ms": 1e3 * statistics.mean(turn[:n]), "last10_turn_ms": 1e3 * statistics.mean(turn[-n:]),
        "latency_ratio": statistics.mean(turn[-n:]) / statistics.mean(turn[:n]),
        "first10_cpu_ms": 1e3 * statistics.mean(cpu[:n]), "last10_cpu_ms": 1e3 * statistics.mean(cpu[-n:]),
        "cpu_ratio": statistics.mean(cpu[-n:]) / statistics.mean(cpu[:n]),
        "first10_ttft_ms": 1e3 * statistics.mean(r["ttft_s"] for r in recs[:n]),
        "last10_ttft_ms": 1e3 * statistics.mean(r["ttft_s"] for r in recs[-n:]),
        "cache_end_mib": cache[-1] / 2 ** 20, "cache_slope_bytes": slope(cache), "formula_bytes": formula,
        "memory_end_mib": recs[-1]["memory_bytes"] / 2 ** 20,
        "memory_slope_bytes": slope([r["memory_bytes"] for r in recs]),
        "decode_tok_s_last10": statistics.mean(r["decode_tokens_per_s"] for r in recs[-n:]),
        "restarts": sum(r.get("restarted", False) for r in recs),
        "max_cached_tokens": max((r.get("stream_tokens", 0) for r in recs), default=0),
    }


def load_store(path: Optional[Path], preset: str, tokens: int, now, bound: Optional[int] = None) -> dict:
    """Fusions an earlier run measured (``--results-store``) with the same preset and tokens per
    turn, except those run again now."""
    if path is None or not path.exists():
        return {}
    import json

    try:
        stored = json.loads(path.read_text())
        runs = stored["runs"]
        missing = set(runs) - set(stored["per_frame"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--results-store {path}: not a streaming benchmark JSON ({type(exc).__name__}: {exc})") from exc
    if missing:
        raise SystemExit(f"--results-store {path}: no per-frame records of {sorted(missing)}")
    if (stored.get("preset"), stored.get("tokens_per_turn"), stored.get("max_context_tokens")) != (
            preset, tokens, bound):
        raise SystemExit(f"--results-store {path} holds preset {stored.get('preset')!r} with "
                         f"{stored.get('tokens_per_turn')} tokens/turn and max_context_tokens "
                         f"{stored.get('max_context_tokens')}, not {preset!r} with {tokens} and {bound}: "
                         "use another store")
    return {name: dict(run, records=stored["per_frame"][name]) for name, run in runs.items() if name not in now}


def report(runs: dict, args, started: float) -> dict:
    """Summary rows, table and the JSON record of the runs so far."""
    from benchmarks.common import machine_info

    casa_tokens = runs.get("casa", {}).get("image_tokens")
    names = [name for name in FUSIONS if name in runs]
    rows = [summarise(name, runs[name], args.tokens, casa_tokens) for name in names]
    text = runs.get("text_only", {}).get("records")
    for row in rows:  # what vision adds per turn, over the text-only LM (CPU time)
        if text is None:
            continue
        own = [r["turn_cpu_s"] - t["turn_cpu_s"] for r, t in zip(runs[row["fusion"]]["records"], text)]
        n = min(10, len(own) // 2) or 1
        row["vision_cpu_ms_first10"] = 1e3 * statistics.mean(own[:n])
        row["vision_cpu_ms_last10"] = 1e3 * statistics.mean(own[-n:])
    table = format_table(rows, [
        ("fusion", "fusion", ""), ("frames", "frames", "d"), ("turn ms first 10", "first10_turn_ms", ".1f"),
        ("turn ms last 10", "last10_turn_ms", ".1f"), ("last/first", "latency_ratio", ".3f"),
        ("CPU ms first 10", "first10_cpu_ms", ".1f"), ("CPU ms last 10", "last10_cpu_ms", ".1f"),
        ("CPU last/first", "cpu_ratio", ".3f"),
        ("over text-only: CPU ms first 10", "vision_cpu_ms_first10", ".1f"),
        ("over text-only: CPU ms last 10", "vision_cpu_ms_last10", ".1f"),
        ("TTFT ms first 10", "first10_ttft_ms", ".1f"), ("TTFT ms last 10", "last10_ttft_ms", ".1f"),
        ("cache MiB at end", "cache_end_mib", ".2f"), ("cache growth B/frame", "cache_slope_bytes", ".0f"),
        ("formula B/frame", "formula_bytes", ".0f"), ("memory growth B/frame", "memory_slope_bytes", ".0f"),
        ("decode tok/s last 10", "decode_tok_s_last10", ".0f"),
        *([("restarts", "restarts", "d"), ("max cached tokens", "max_cached_tokens", "d")]
          if getattr(args, "max_context_tokens", None) else [])])
    return {"preset": args.preset, "config": PRESETS[args.preset], "frames": args.frames, "tokens_per_turn": args.tokens,
            "max_context_tokens": getattr(args, "max_context_tokens", None),
            "threads": args.threads, "device": args.device, "machine": machine_info(), "summary": rows,
            "table": table, "wall_s": time.time() - started, "budget_s": args.budget_s,
            "targets": {"casa_latency_ratio_max": 1.05, "casa_cache_growth_equals_text_formula": True},
            "not_run": list(getattr(args, "not_run", [])), "total_budget_s": getattr(args, "total_budget_s", None),
            "per_frame": {name: runs[name]["records"] for name in names},
            "runs": {name: {k: v for k, v in runs[name].items() if k != "records"} for name in names}}


def main(argv=None) -> dict:
    from casa_megatron.inference.report import plot_series
    from casa_megatron.runtime.atomic import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu_tiny", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16, help="caption tokens per turn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="default: benchmarks/results/streaming_<preset>.json")
    p.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated subset of {','.join(FUSIONS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"stop each fusion's stream after this many seconds (at least {MIN_FRAMES} frames; "
                        "the frames reached are reported)")
    p.add_argument("--total-budget-s", type=float, default=None,
                   help="seconds the whole command may take: each fusion streams for an equal share of what is "
                        "left, less the previous fusion's start-up; a fusion with no time left is not run")
    p.add_argument("--results-store", default=None,
                   help="JSON carrying fusions across runs (one lent-GPU call per fusion): fusions not run now "
                        "are kept from it, every fusion run now is written into it")
    p.add_argument("--max-context-tokens", type=int, default=None,
                   help="bound each captioner's self-attention cache (casa-stream --max-context-tokens): a turn "
                        "that could pass it starts the stream afresh; default: no bound (the paper's protocol)")
    p.add_argument("--start-method", choices=("fork", "spawn"), default=None,
                   help="how each fusion's process starts (default: spawn where CUDA is available, else fork)")
    args = p.parse_args(argv)
    fusions = [f for f in args.fusions.split(",") if f]
    if not fusions or set(fusions) - set(FUSIONS):
        p.error(f"--fusions takes names from {FUSIONS}, got {args.fusions!r}")
    out_json = Path(args.json or ROOT / "benchmarks" / "results" / f"streaming_{args.preset}.json")
    store = Path(args.results_store) if args.results_store else None
    started = time.time()
    runs = load_store(store, args.preset, args.tokens, set(fusions), args.max_context_tokens)

    def publish() -> dict:
        result = report(runs, args, started)
        atomic_write_json(out_json, result)
        if store is not None:
            atomic_write_json(store, result)
        return result

    deadline = time.monotonic() + args.total_budget_s if args.total_budget_s is not None else None
    order = [f for f in FUSIONS if f in fusions]
    startup = STARTUP_GUESS_S if args.device.startswith("cuda") else 0.0
    args.not_run = []
    result = publish()
    for k, name in enumerate(order):
        budget = args.budget_s
        if deadline is not None:
            share = (deadline - time.monotonic()) / (len(order) - k) - startup
            if share <= 0:
                print(f"{name}: not run, the --total-budget-s is spent", file=sys.stderr)
                args.not_run.append(name)
                result = publish()
                continue
            budget = share if budget is None else min(budget, share)
        runs[name] = run_in_child(_run_fusion, name, args.preset, args.frames, args.tokens, args.threads,
                                  args.device, budget, args.max_context_tokens, what="streaming benchmark",
                                  method=args.start_method)
        startup = runs[name].get("startup_s", startup)
        result = publish()  # after every fusion: a run cut short keeps what finished
    print(result["table"])
    plot_series(out_json.with_suffix(".png"), result["per_frame"],
                f"streaming {args.preset}: {args.tokens} tokens/turn, {args.frames} frames")
    return result


if __name__ == "__main__":
    main()

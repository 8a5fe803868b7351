"""Export time and peak memory of ``casa-convert export-hf`` from a training checkpoint.

    python benchmarks/export_hf.py --preset small|mid --json OUT.json [--plot RSS.png] [--workdir DIR] [--keep]

1. A child process builds the preset's model (bf16, random weights) and writes it as a training
   checkpoint: ``run/checkpoints/iter_0000001`` with the model's megatron dist checkpoint,
   ``config.yaml`` and ``manifest.json``, plus a small word tokenizer. The optimizer state is
   left out (export never reads it; for the mid preset it would be ~15 GB of fp32 Adam state).
2. ``python -m casa_megatron.conversion export-hf RUN OUT`` runs in another child; its RSS is
   sampled every 0.2 s (psutil) and its own peak (``ru_maxrss``) printed by a wrapper at exit.
3. Sizes, times and the peak go to JSON (and a plot); the folders are deleted unless ``--keep``.

Presets: ``small`` = the README main job's CASA model (``configs/tiny_cpu.yaml``, ~1 M
parameters); ``mid`` = a Qwen2.5-0.5B-shaped LM (24 layers, width 896, vocabulary 151936, tied)
with CASA in every layer and the full Qwen2.5-VL vision encoder (32 blocks, width 1280): 1.2 B
parameters, 2.5 GB in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.import_hf import _du, plot, run_sampled  # noqa: E402

PRESETS = {
    "small": {"lm": dict(vocab_size=256, num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=192),
              "vision": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128),
              "fusion": dict(mechanism="casa", placement="parallel")},
    "mid": {"lm": dict(family="qwen2", vocab_size=151936, make_vocab_size_divisible_by=128, tie_word_embeddings=True,
                       num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                       ffn_hidden_size=4864, add_qkv_bias=True, rotary_base=1e6, max_position_embeddings=32768),
            "vision": dict(encoder="qwen2_5_vl", num_layers=32, hidden_size=1280, num_attention_heads=16,
                           ffn_hidden_size=3420, ffn_pad_multiple=8, temporal_patch_size=2,
                           fullatt_block_indexes=[7, 15, 23, 31]),
            "fusion": dict(mechanism="casa", placement="parallel")},
}
PEAK_WRAPPER = ("import resource, runpy, sys\n"
                "sys.argv = ['casa-convert', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('casa_megatron.conversion', run_name='__main__')\n"
                "finally:\n    print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', "
                "file=sys.stderr, flush=True)\n")


def make_checkpoint(preset: str, run: Path) -> dict:
    """(child) The preset's model with random bf16 weights, saved as a training checkpoint."""
    import torch

    from casa_megatron.config import save_config
    from casa_megatron.config.loader import load_config_dict
    from casa_megatron.config.schema import ParallelConfig, TrainConfig
    from casa_megatron.data.tokenization import build_word_tokenizer
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.ckpt_manifest import write_manifest
    from casa_megatron.training.pretrained import save_model_weights

    tok = build_word_tokenizer([" ".join(f"w{i}" for i in range(200))], run / "tokenizer")
    cfg = load_config_dict(TrainConfig, {"model": {**PRESETS[preset], "transformer_impl": "local"},
                                         "precision": {"bf16": True}, "run_dir": str(run),
                                         "data": {"tokenizer_path": str(tok)}})
    initialize_parallel(1, 1, seed=0)
    t0 = time.perf_counter()
    model = build_vlm(cfg.model, ParallelConfig(), cfg.data.image_seq_length, torch.bfloat16,
                      skip_init=("lm", "vision", "projector"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    folder = run / "checkpoints" / "iter_0000001"
    save_model_weights(model, folder, release_model=True)
    save_config(cfg, folder / "config.yaml")
    write_manifest(folder, 1)
    (folder.parent / "latest").write_text(folder.name)
    return {"parameters": params, "bytes": nbytes, "write_s": time.perf_counter() - t0,
            "checkpoint_bytes": _du(folder)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)  # (child) write the checkpoint here
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        print(json.dumps(make_checkpoint(args.preset, Path(args.make_checkpoint))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="export_hf_", dir=args.workdir))
    try:
        run, out = work / "run", work / "hf"
        made = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--json", "-",
                               "--make-checkpoint", str(run)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if made.returncode != 0:
            raise RuntimeError(made.stderr[-4000:])
        written = json.loads(made.stdout.strip().splitlines()[-1])
        print(f"checkpoint: {written['parameters'] / 1e9:.3f} B parameters, {written['bytes'] / 2 ** 30:.2f} GiB "
              f"bf16, written in {written['write_s']:.0f} s", flush=True)
        cmd = [sys.executable, "-c", PEAK_WRAPPER, "export-hf", str(run), str(out), "--no-progress"]
        result = run_sampled(cmd, "export-hf [")
        peak = int(next(l for l in result["stderr_tail"].splitlines() if l.startswith("peak_rss_kib="))
                   .split("=")[1]) * 1024
        samples = result.pop("rss_samples")
        summary = {"preset": args.preset, "model": PRESETS[args.preset], "checkpoint": written,
                   "export_wall_s": result["wall_s"], "peak_rss_gib": peak / 2 ** 30,
                   "peak_rss_sampled_gib": max(r for _, r in samples) / 2 ** 30 if samples else None,
                   "model_gib": written["bytes"] / 2 ** 30, "peak_over_model": peak / written["bytes"],
                   "output_gib": _du(out) / 2 ** 30, "output_files": sorted(p.name for p in out.iterdir()),
                   "cli_stdout": result["stdout"], "phases": result["phases"],
                   "load_average_at_end": os.getloadavg()}
        from benchmarks.common import machine_info

        summary["machine"] = machine_info()
        print(json.dumps(summary, indent=1))
        Path(args.json).write_text(json.dumps({**summary, "rss_samples": samples}, indent=1))
        if args.plot and samples:
            short = [(t, name.split(" (")[0].split(" /")[0]) for t, name in summary["phases"]]  # no paths
            plot(samples, short, written["bytes"], Path(args.plot),
                 title=f"casa-convert export-hf, {args.preset} preset ({written['parameters'] / 1e9:.2f} B, bf16)",
                 label="export-hf RSS", ref_label="model size")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Import time and peak memory of ``casa-convert import-hf`` on a full-size Qwen2.5-VL-3B-shaped
checkpoint (random bf16 weights; nothing is downloaded).

    python benchmarks/import_hf.py --json OUT.json [--plot RSS.png] [--layers N] [--workdir DIR] [--keep]
    python benchmarks/import_hf.py --backbone qwen3_1_7b --json OUT.json   # + Qwen2.5-VL-3B's encoder

``--backbone qwen3_1_7b``: a Qwen3-1.7B-shaped LM checkpoint (its published config: per-head q/k
norms, head_dim 128, tied embeddings) imported with ``--vision-from`` a Qwen2.5-VL-3B-shaped one
(whose LM is cut to one layer: only its encoder and merger are read), under the recipe
``configs/qwen3_1_7b_casa_parallel.yaml`` -- every CASA layer's q/k norms and projections are
initialised from its self-attention.

1. transformers builds ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-3B's published
   config on the *meta* device (names and shapes only, no memory) and writes its config.json;
   the random bf16 tensors are then generated and written shard by shard (<= 2 GiB per
   ``model-XXXXX-of-YYYYY.safetensors`` + index JSON, hub key layout, no ``lm_head``: tied), so
   this script never holds the model either.
2. ``python -m casa_megatron.conversion import-hf`` runs in a child process with the recipe
   ``configs/qwen25vl3b_casa_frozen_lm.yaml``; its RSS is sampled every 0.2 s (psutil) and its
   peak read from the kernel (``ru_maxrss`` of the child).
3. Sizes, times and the peak are printed and written as JSON; the folders are deleted (unless
   ``--keep``). ``--layers`` shrinks the LM and ViT depth for a quick dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHARD_BYTES = 2 * 1024 ** 3
RECIPE = ROOT / "configs" / "qwen25vl3b_casa_frozen_lm.yaml"
QWEN3_RECIPE = ROOT / "configs" / "qwen3_1_7b_casa_parallel.yaml"


def qwen3_1_7b_config(layers: int = 0):
    """Qwen3-1.7B's published sizes (config.json on the hub)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers or 28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16",
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen25vl_3b_config(layers: int = 0, lm_layers: int = 0):
    """Qwen2.5-VL-3B-Instruct's published sizes (config.json on the hub)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                         num_hidden_layers=lm_layers or layers or 36, num_attention_heads=16, num_key_value_heads=2,
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=layers or 32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=2048,
                           fullatt_block_indexes=[layers - 1] if layers else [7, 15, 23, 31]),
        tie_word_embeddings=True, dtype="bfloat16")


def _hub_name(name: str) -> str:
    for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def write_checkpoint(folder: Path, layers: int = 0, backbone: str = "qwen2_5_vl_3b", lm_layers: int = 0) -> dict:
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM

    if backbone == "qwen3_1_7b":
        config = qwen3_1_7b_config(layers)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
    else:
        config = qwen25vl_3b_config(layers, lm_layers)
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
    config.save_pretrained(str(folder))
    shapes = [(_hub_name(n), tuple(p.shape)) for n, p in model.state_dict().items() if n != "lm_head.weight"]
    del model
    total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    n_shards = -(-total // SHARD_BYTES)
    weight_map, shard, size, index = {}, {}, 0, 1
    g = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size, index
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        if "norm" in name and len(shape) == 1:
            shard[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[name] = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        size += nbytes
    if shard:
        flush()
    n_written = index - 1
    if n_written != n_shards:  # names promised n_shards files; rename to the true count
        for old in sorted(folder.glob("model-*.safetensors")):
            new = old.name.replace(f"-of-{n_shards:05d}", f"-of-{n_written:05d}")
            old.rename(folder / new)
        weight_map = {k: v.replace(f"-of-{n_shards:05d}", f"-of-{n_written:05d}") for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"tensors": len(shapes), "parameters": total // 2, "bytes": total, "shards": n_written}


def run_import(hf: Path, out: Path, layers: int = 0, interval: float = 0.2, recipe: Path = RECIPE,
               vision_from: Path | None = None) -> dict:
    """Run the CLI in a child; sample its RSS; timestamp its phase lines as they arrive."""
    shrink = [f"model.vision.num_layers={layers}", f"model.vision.trainable_blocks={min(layers, 4)}"] if layers else []
    vision = ["--vision-from", str(vision_from)] if vision_from else []
    cmd = [sys.executable, "-m", "casa_megatron.conversion", "import-hf", str(hf), str(out),
           "--config", str(recipe), "--no-progress", *vision, *shrink]
    result = run_sampled(cmd, "import-hf [", interval)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def run_sampled(cmd, phase_prefix: str, interval: float = 0.2) -> dict:
    """Run ``cmd`` in a child: its RSS every ``interval`` s (psutil), and the time of each stderr
    line starting with ``phase_prefix`` (the conversion commands' timed phase lines)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    samples, phases, stderr, stdout = [], [], [], []

    def sample():
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - start, ps.memory_info().rss))
            except psutil.Error:
                break
            time.sleep(interval)

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if line.startswith(phase_prefix):
                phases.append((time.perf_counter() - start, line.split("] ", 1)[1].strip()))

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read_stderr)]
    for t in threads:
        t.start()
    stdout.append(proc.stdout.read())
    proc.wait()
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[3:5]} failed ({proc.returncode}):\n{''.join(stderr)[-4000:]}")
    return {"wall_s": wall, "rss_samples": samples, "phases": phases, "stdout": "".join(stdout).strip(),
            "stderr_tail": "".join(stderr).strip()[-2000:]}


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _merged_phases(phases, gap: float):
    """Phases that start within ``gap`` seconds of each other share one label (no overprint)."""
    merged = []
    for t_phase, name in phases:
        name = name.replace("the ", "")
        if merged and t_phase - merged[-1][0] < gap:
            merged[-1] = (merged[-1][0], f"{merged[-1][1]} / {name}")
        else:
            merged.append((t_phase, name))
    return merged


def plot(samples, phases, hf_bytes: int, path: Path, title: str = "casa-convert import-hf, Qwen2.5-VL-3B-shaped bf16 "
         "checkpoint", label: str = "import-hf RSS", ref_label: str = "HF checkpoint size") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*samples)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, [r / 2 ** 30 for r in rss], label=label)
    ax.axhline(hf_bytes / 2 ** 30, color="grey", ls="--", label=ref_label)
    ax.axhline(2 * hf_bytes / 2 ** 30, color="red", ls=":", label=f"2x {ref_label.split()[0]} size")
    top = max(r for _, r in samples) / 2 ** 30
    for t_phase, name in _merged_phases(phases, gap=0.03 * t[-1]):
        ax.axvline(t_phase, color="black", lw=0.5, alpha=0.4)
        ax.text(t_phase, top * 1.02, name, rotation=90, fontsize=7, va="top", ha="right")
    ax.set_xlabel("seconds since the command started")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--layers", type=int, default=0, help="LM/ViT depth (0 = the real 36/32)")
    parser.add_argument("--backbone", choices=["qwen2_5_vl_3b", "qwen3_1_7b"], default="qwen2_5_vl_3b",
                        help="qwen3_1_7b: a Qwen3-1.7B LM with Qwen2.5-VL-3B's encoder (--vision-from)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="import_hf_", dir=args.workdir))
    try:
        hf, out = work / "hf", work / "imported"
        hf.mkdir()
        t0 = time.perf_counter()
        written = write_checkpoint(hf, args.layers, args.backbone)
        written["write_s"] = time.perf_counter() - t0
        print(f"wrote {written['parameters'] / 1e9:.2f} B parameters ({written['bytes'] / 2 ** 30:.2f} GiB bf16) "
              f"in {written['shards']} shards, {written['write_s']:.0f} s", flush=True)
        recipe, vision_from = RECIPE, None
        if args.backbone == "qwen3_1_7b":
            vision_from, recipe = work / "vision_source", QWEN3_RECIPE
            vision_from.mkdir()
            source = write_checkpoint(vision_from, args.layers, "qwen2_5_vl_3b", lm_layers=1)
            written["vision_source"] = source
            print(f"wrote the vision source: {source['parameters'] / 1e9:.2f} B parameters (its LM cut to one "
                  "layer)", flush=True)
        result = run_import(hf, out, args.layers, recipe=recipe, vision_from=vision_from)
        samples = result.pop("rss_samples")
        summary = {
            "checkpoint": written, "import_wall_s": result["wall_s"],
            "peak_rss_gib": result["peak_rss_bytes"] / 2 ** 30, "hf_checkpoint_gib": written["bytes"] / 2 ** 30,
            "peak_over_checkpoint": result["peak_rss_bytes"] / written["bytes"],
            "output_gib": _du(out) / 2 ** 30, "cli_stdout": result["stdout"], "cli_stderr_tail": result["stderr_tail"],
            "load_average_at_end": os.getloadavg(), "recipe": str(recipe.relative_to(ROOT)),
            "backbone": args.backbone,
            "phases": result["phases"],
        }
        report = json.loads((out / "import_report.json").read_text())
        summary["import_report"] = report["summary"]
        from benchmarks.common import machine_info

        summary["machine"] = machine_info()
        print(json.dumps({k: v for k, v in summary.items() if k != "cli_stderr_tail"}, indent=1))
        Path(args.json).write_text(json.dumps({**summary, "rss_samples": samples}, indent=1))
        if args.plot:
            title = ("casa-convert import-hf, Qwen2.5-VL-3B-shaped bf16 checkpoint" if args.backbone != "qwen3_1_7b"
                     else "casa-convert import-hf, Qwen3-1.7B + Qwen2.5-VL-3B encoder, bf16")
            plot(samples, summary["phases"], written["bytes"], Path(args.plot), title=title)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

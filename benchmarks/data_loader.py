#!/usr/bin/env python
"""Loader throughput on realistic media, and the megatron-energon comparison (docs/data.md).

    python benchmarks/data_loader.py make --out /tmp/casa_loader_bench      # the media, once (~1 min)
    python benchmarks/data_loader.py ours --data /tmp/casa_loader_bench [--workers 0,1,2] [--kinds thread,process]
        [--budgets 448,896] [--sets jpeg896,multi,video] [--repeats 2]
        [--no-pack]
    python benchmarks/data_loader.py energon --data /tmp/casa_loader_bench [--workers 0,1,2]
    python benchmarks/data_loader.py plot     # docs/images/data_loader_throughput.png from the results below

Media (webdataset tar shards, LLaVA JSON, the generated word tokenizer with its chat template):
  jpeg896  one 896x896 photo-like JPEG per sample (q90, ~170 KB: smooth structure + sensor-like noise)
  multi    2-4 JPEGs per sample, each side drawn in 448-896 px
  video    10 s H.264 clips, 448x336 at 30 fps, a caption every second, sampled at 2 fps (20 frames)

``ours`` runs ``make_train_iterator`` end to end (read, decode, resize, chat template, pack, collate
into a VLMBatch of normalised patches) and reports delivered samples/s and images/s (video: frames/s)
after one warm-up batch. ``energon`` reads the jpeg896 shards with megatron-energon (``energon
prepare``, CrudeWebdataset + a cooker doing the same decode + smart resize, its savable loader) and
checks its resume: state saved after k samples, a fresh loader restored from it, the next keys
compared with an uninterrupted run's. Results go to benchmarks/results/data_loader*.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.runtime.atomic import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("jpeg896", "multi", "video")
QUESTION = "what colour is the shape ?"


# --- media -------------------------------------------------------------------------------------
def photo_jpeg(rng, height: int, width: int, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo: low-frequency structure, texture and noise."""
    import numpy as np
    from PIL import Image, ImageFilter

    coarse = rng.normal(size=(height // 32 + 2, width // 32 + 2, 3))
    coarse = ((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).filter(ImageFilter.SMOOTH).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _llava(n_images: int) -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": "<image>\n" * n_images + QUESTION},
                                         {"from": "gpt", "value": "red"}]}).encode()


def make_media(out: Path, n_jpeg: int = 96, n_multi: int = 48, n_video: int = 8, seed: int = 0) -> None:
    import numpy as np
    from tqdm import tqdm

    from casa_megatron.data.shards import ShardWriter
    from casa_megatron.data.synthetic_dataset import CHAT_SPECIALS, CHAT_TEMPLATE
    from casa_megatron.data.synthetic_media import render_clip
    from casa_megatron.data.tokenization import build_word_tokenizer
    from casa_megatron.data.video.encode import encode_video

    rng = np.random.default_rng(seed)
    build_word_tokenizer([QUESTION + " red the circle square moves right left and is at middle top bottom "
                          "user assistant system"], out / "tokenizer", extra_tokens=CHAT_SPECIALS,
                         chat_template=CHAT_TEMPLATE)
    with ShardWriter(out / "jpeg896", 32) as w:
        for i in tqdm(range(n_jpeg), desc="jpeg896"):
            w.write(f"j{i:05d}", {"jpg": photo_jpeg(rng, 896, 896), "json": _llava(1)})
    with ShardWriter(out / "multi", 16) as w:
        for i in tqdm(range(n_multi), desc="multi"):
            k = int(rng.integers(2, 5))
            parts = {f"{j}.jpg": photo_jpeg(rng, int(rng.integers(448, 897)), int(rng.integers(448, 897)))
                     for j in range(k)}
            w.write(f"m{i:05d}", {**parts, "json": _llava(k)})
    with ShardWriter(out / "video", 4) as w:
        for i in tqdm(range(n_video), desc="video"):
            frames, captions = render_clip(rng, width=448, height=336, fps=30, seconds=10.0)
            w.write(f"v{i:05d}", {"mp4": encode_video(frames, 30, "h264"),
                                  "json": json.dumps({"captions": captions}).encode()})


# --- our loader --------------------------------------------------------------------------------
def measure_ours(data: Path, name: str, workers: int, kind: str, budget: int, min_images: int = 96,
                 pack: bool = True) -> Dict:
    """Delivered rate of ``make_train_iterator``; ``pack=False`` stops at decoded, tokenised samples
    (the work energon's loader does here, without packing and patch collation)."""
    from casa_megatron.data.config import DataConfig
    from casa_megatron.data.loader import make_train_iterator

    video = name == "video"
    cfg = DataConfig(source=str(data / name), tokenizer_path=str(data / "tokenizer"), seq_length=4096,
                     image_seq_length=16384, pixel_budget=budget * budget, video_pixel_budget=448 * 336,
                     max_frames=20, num_workers=workers, worker_type=kind, pack_buffer=4, log_interval=0,
                     window_per_frame=True)
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    next(it)  # warm-up: workers start, tokenizer loads, the packing buffer fills
    samples = images = 0
    start, cpu = time.perf_counter(), time.process_time()  # process time: every thread of this process
    while images < (min_images // 2 if video else min_images) * (20 if video else 1):
        if pack:
            batch = next(it)
            samples += len(it.last_batch_samples)
            images += int(batch.image_grid_hw.shape[0])
        else:
            samples += 1
            images += len(it._next_sample().images)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    skipped = it.skip_counts()
    it.close()
    assert not skipped, skipped
    return {"set": name, "stage": "packed batches" if pack else "decoded samples", "workers": workers,
            "worker_type": kind, "pixel_budget": "448x336 frames" if video else f"{budget}x{budget}",
            "samples": samples, "images": images, "seconds": round(elapsed, 3),
            "samples_per_s": round(samples / elapsed, 2), "images_per_s": round(images / elapsed, 2),
            # CPU seconds per image in this process (thread workers only: process workers' time is theirs)
            "cpu_ms_per_image": round(1000 * cpu / images, 1) if kind == "thread" or not workers else None,
            "load_average_1min": round(os.getloadavg()[0], 2)}


# --- megatron-energon --------------------------------------------------------------------------
def _energon_loader(root: Path, workers: int, budget: int):
    os.environ["CASA_BENCH_PIXEL_BUDGET"] = str(budget * budget)  # read by energon_task at import
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from energon_task import Encoder
    from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

    ds = get_train_dataset(root, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=workers),
                           batch_size=1, shuffle_buffer_size=16, max_samples_per_sequence=16,
                           task_encoder=Encoder())
    return get_savable_loader(ds, checkpoint_every_min_n_samples=8, n_checkpoints=2 * max(1, workers) + 2)


def measure_energon(data: Path, workers: int, budget: int, min_images: int = 96) -> Dict:
    root = data / "jpeg896_energon"
    if not (root / ".nv-meta").is_dir():
        shutil.copytree(data / "jpeg896", root, dirs_exist_ok=True)
        subprocess.run(["energon", "prepare", str(root), "--non-interactive", "--split-ratio", "1,0,0",
                        "--sample-type", "CrudeWebdataset", "--force-overwrite", "--no-progress"], check=True,
                       capture_output=True)
    loader = _energon_loader(root, workers, budget)
    it = iter(loader)
    next(it)
    start, images = time.perf_counter(), 0
    while images < min_images:
        images += sum(len(s.pixels) for s in next(it))
    elapsed = time.perf_counter() - start
    # exact resume: keys after a restore vs an uninterrupted run
    for _ in range(13):
        next(it)
    state = loader.save_state_rank()
    expected = [s.__key__ for _ in range(12) for s in next(it)]
    del it, loader
    restored = _energon_loader(root, workers, budget)
    restored.restore_state_rank(state)
    got = [s.__key__ for _, batch in zip(range(12), restored) for s in batch]
    first = [s.__key__ for _, batch in zip(range(16), _energon_loader(root, workers, budget)) for s in batch]
    return {"set": "jpeg896", "loader": "megatron-energon", "workers": workers, "pixel_budget": f"{budget}x{budget}",
            "images": images, "seconds": round(elapsed, 3), "images_per_s": round(images / elapsed, 2),
            "resume_exact": got == expected, "resume_expected": expected, "resume_got": got, "first_keys": first}


# --- plot --------------------------------------------------------------------------------------
def plot(ours: Path, energon: Path, out: Path) -> None:
    """images/s against workers: each media set and budget (ours, end to end) and energon's decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_by(rows, key):
        groups: Dict = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r["images_per_s"])
        return {k: sum(v) / len(v) for k, v in groups.items()}

    mine = mean_by(json.loads(ours.read_text())["rows"], lambda r: (r["set"], r["pixel_budget"], r["workers"]))
    theirs = mean_by(json.loads(energon.read_text())["rows"], lambda r: ("energon", r["pixel_budget"], r["workers"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for series in (mine, theirs):
        for name, budget in sorted({k[:2] for k in series}):
            points = sorted((w, v) for (n, b, w), v in series.items() if (n, b) == (name, budget))
            label = (f"{name} (decode only)" if name == "energon" else name) + f", {budget}"
            ax.plot([w for w, _ in points], [v for _, v in points], "o--" if name == "energon" else "o-", label=label)
    ax.axhline(40, color="grey", ls=":", label="goal: 40 images/s of 896x896 JPEGs, 2 workers")
    ax.set_xlabel("workers"), ax.set_ylabel("images (video: frames) per second"), ax.set_xticks([0, 1, 2])
    ax.legend(fontsize=7), fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --- cli ---------------------------------------------------------------------------------------
def _machine() -> Dict:
    load = os.getloadavg()
    return {"cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "load_average_1_5_15": [round(x, 2) for x in load], "python": platform.python_version()}


def _save(name: str, rows: List[Dict]) -> Path:
    return atomic_write_json(RESULTS / name, {"machine": _machine(), "rows": rows}, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("make", "ours", "energon", "plot"))
    p.add_argument("--out", "--data", dest="data", default="/tmp/casa_loader_bench")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--kinds", default="thread,process")
    p.add_argument("--budgets", default="448,896")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--no-pack", action="store_true", help="ours: time decoded samples, not packed batches")
    args = p.parse_args(argv)
    data = Path(args.data)
    if args.mode == "make":
        make_media(data)
        return 0
    if args.mode == "plot":
        out = Path(__file__).resolve().parents[1] / "docs" / "images" / "data_loader_throughput.png"
        plot(RESULTS / "data_loader_ours_matrix_quiet.json", RESULTS / "data_loader_energon_quiet.json", out)
        print(f"wrote {out}")
        return 0
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    if args.mode == "ours":
        for name in args.sets.split(","):
            for budget in ([448] if name == "video" else [int(b) for b in args.budgets.split(",")]):
                for kind in args.kinds.split(","):
                    for w in workers:
                        if w == 0 and kind != args.kinds.split(",")[0]:
                            continue  # no workers: the kind does not matter
                        for r in range(args.repeats):
                            row = measure_ours(data, name, w, kind, budget, pack=not args.no_pack)
                            row.update(repeat=r, worker_type=kind if w else "none")
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    else:
        for w in workers:
            for r in range(args.repeats):
                row = measure_energon(data, w, int(args.budgets.split(",")[-1]))
                row["repeat"] = r
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("resume_expected", "resume_got")}),
                      flush=True)
        orders = {row["workers"]: row["first_keys"] for row in rows}
        same = len({tuple(v) for v in orders.values()}) == 1
        print(f"energon: the first 16 samples are {'the same' if same else 'NOT the same'} for workers "
              f"{sorted(orders)}")
    print(f"wrote {_save(f'data_loader_{args.mode}{args.tag}.json', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

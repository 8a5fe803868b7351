#!/usr/bin/env python
"""Generate a small real dataset (PNG images, H.264 clips, tokenizer, shards, manifest).

    python tools/make_synthetic_data.py --out data/synth [--num-images 192 --num-videos 24 --seed 0]

Train on it with ``data.source=data/synth/shards`` (the tokenizer is found next to it) or
``data.source=data/synth/manifest.jsonl``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.data.synthetic_dataset import make_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=192)
    p.add_argument("--num-videos", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--video-codec", choices=("h264", "vp9"), default="h264")
    p.add_argument("--video-seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    paths = make_dataset(args.out, args.num_images, args.num_videos, args.seed, args.samples_per_shard,
                         args.video_codec, video_seconds=args.video_seconds)
    n_shards = len(list(paths["shards"].glob("*.tar")))
    print(f"wrote {args.num_images} images + {args.num_videos} clips to {paths['raw']}, {n_shards} shards in "
          f"{paths['shards']}, manifest {paths['manifest']}, tokenizer {paths['tokenizer']} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate a small real dataset (PNG images, H.264 clips, two-image LLaVA samples, a tokenizer
with a chat template, shards, manifest, a validation split).

    python tools/make_synthetic_data.py --out data/synth [--num-images 192 --num-videos 24 --num-multi 64
        --valid-fraction 0.125 --seed 0] [--if-stale]

``--if-stale`` keeps an existing dataset made by the same generator version with the same
arguments (``generator.json`` in it) and otherwise rebuilds it in a temporary directory that
replaces the old one only once complete.

Train on it with ``data.source=data/synth/shards`` (the tokenizer is found next to it),
``data.source=data/synth/manifest.jsonl``, or a blend with the two-image samples
(``data.sources=[{path: data/synth/shards, weight: 3}, {path: data/synth/multi, weight: 1}]``)
and ``data.valid=[{path: data/synth/valid}]`` (configs/tiny_cpu.yaml + dev.sh train). See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.data.synthetic_dataset import make_dataset  # noqa: E402
from casa_megatron.data.synthetic_media import GENERATOR_VERSION  # noqa: E402
from casa_megatron.runtime.lock import pid_alive  # noqa: E402

STAMP = "generator.json"


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{os.getpid()}-"


def _remove_stale_temporaries(out: Path) -> None:
    """A run killed with SIGKILL cannot clean up: its temporary folder carries its pid, and the
    next run removes it once that process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    for path in sorted(out.parent.glob(f".{out.name}.*")):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists() and (path / out.name).is_dir():
            (path / out.name).replace(out)  # killed mid-swap: the previous dataset goes back
            print(f"restored {out} from {path}, left by a run killed while replacing it")
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}, left behind by a killed run")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the ``finally`` that removes the temporary folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=192)
    p.add_argument("--num-videos", type=int, default=24)
    p.add_argument("--num-multi", type=int, default=64, help="two-image samples (LLaVA format)")
    p.add_argument("--valid-fraction", type=float, default=0.125,
                   help="held-out split size, as a fraction of each kind (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--video-codec", choices=("h264", "vp9"), default="h264")
    p.add_argument("--video-seconds", type=float, default=3.0)
    p.add_argument("--if-stale", action="store_true",
                   help="do nothing if --out holds a dataset of this generator version and these arguments")
    args = p.parse_args(argv)
    out = Path(args.out)
    stamp = {"generator_version": GENERATOR_VERSION,
             **{k: v for k, v in vars(args).items() if k not in ("out", "if_stale")}}
    if args.if_stale and (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        print(f"{out} is up to date (generator version {GENERATOR_VERSION})")
        return 0
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    try:
        make_dataset(tmp, args.num_images, args.num_videos, args.seed, args.samples_per_shard,
                     args.video_codec, video_seconds=args.video_seconds, num_multi=args.num_multi,
                     valid_fraction=args.valid_fraction)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
        if out.exists():  # swap only once the new dataset is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            out.replace(old / out.name)
            tmp.replace(out)
            shutil.rmtree(old)
        else:
            tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    paths = {"raw": out / "raw", "tokenizer": out / "tokenizer", "shards": out / "shards",
             "manifest": out / "manifest.jsonl"}
    n_shards = len(list(paths["shards"].glob("*.tar")))
    print(f"wrote {args.num_images} images + {args.num_videos} clips to {paths['raw']}, {n_shards} shards in "
          f"{paths['shards']}, manifest {paths['manifest']}, {args.num_multi} two-image samples in {out / 'multi'}, "
          f"validation split {out / 'valid'}, tokenizer {paths['tokenizer']} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

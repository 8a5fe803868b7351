#!/usr/bin/env python
"""Pack loose ``<key>.<ext>`` files (``<key>.json`` + an image or video) into tar shards.

    python tools/build_shards.py SRC_DIR OUT_DIR --samples-per-shard 1000 [--manifest OUT.jsonl] [--force]

Keys are relative paths up to the first dot of the file name (the webdataset convention);
samples are written in sorted key order, so the same files always give the same shards.
OUT_DIR appears complete or not at all; an existing, non-empty one is replaced only with --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.data.build import build_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_dir")
    p.add_argument("out_dir")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--manifest", default=None, help="also write a JSONL manifest of the source files")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty OUT_DIR (once the new one is complete)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths = build_shards(args.src_dir, args.out_dir, args.samples_per_shard, args.manifest, force=args.force)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shard(s) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Save the index of every tar shard once, so that no training start scans a tar.

    python tools/index_shards.py SHARD_DIR_OR_TAR [...] [--threads 8] [--rebuild] [--index-dir DIR]

Each shard's index goes to ``<folder>/.casa_index/<shard>.idx`` (casa_megatron/data/shard_index.py),
or, with ``--index-dir`` (a read-only data set), under that folder: give training the same folder
as ``data.index_dir``.
A loader builds missing or stale indexes itself on its first start (every rank, each scanning
every tar that lacks one); for a large data set, run this once where the folder is writable.
``build_shards`` writes the indexes of the shards it builds. Exit code 1 if a shard has nothing
readable or its index could not be written (each named); damaged shards are listed and kept
indexed up to the damage, as a loader uses them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.data.shard_index import index_shards, shard_paths  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("locations", nargs="+", help="folders of *.tar shards and/or .tar files")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rebuild", action="store_true", help="index every shard again, even where a current index exists")
    p.add_argument("--index-dir", default="", help="save the indexes here instead of beside the shards "
                   "(the run's data.index_dir; an index current beside a shard is kept)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        shards = shard_paths(args.locations)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not shards:
        print(f"error: no *.tar shards in {', '.join(args.locations)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = index_shards(shards, args.threads, args.rebuild, progress=not args.no_progress,
                          index_dir=args.index_dir or None)
    print(f"{report.shards} shard(s), {report.samples} samples: {report.built} indexed, {report.up_to_date} already "
          f"up to date ({time.perf_counter() - start:.1f} s)")
    for line in report.damaged:
        print(f"damaged (indexed up to the damage): {line}")
    for line in report.failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert Hugging Face Parquet datasets (The Cauldron, TRL chat messages, LLaVA-OneVision-Data,
benchmark releases such as lmms-eval's DocVQA) into indexed webdataset tar shards that the loader
and casa-eval read at random.

    python tools/convert_parquet.py SRC [SRC ...] OUT_DIR [--samples-per-shard 1000] [--media-root DIR]
        [--metric exact|vqa|anls|relaxed] [--force]

SRC: .parquet files or folders of them (e.g. a `huggingface-cli download --repo-type dataset`
folder; searched recursively, converted in sorted order). The row layout is told from the
columns (casa_megatron/data/parquet.py). OUT_DIR appears complete or not at all; an existing,
non-empty one is replaced only with --force. Rows that cannot become samples are skipped and
counted; exit code 2 for unreadable input or no sample at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.data.parquet import convert  # noqa: E402
from casa_megatron.data.records import ShardError  # noqa: E402
from casa_megatron.runtime.atomic import OutputExists  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help=".parquet files or folders, then OUT_DIR last")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--media-root", default=None, help="where image paths of rows without image bytes point")
    p.add_argument("--metric", default=None, help="benchmark rows (question / answers / image): the casa-eval "
                   "metric written into each sample (exact, vqa, anls, relaxed)")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty OUT_DIR (once the new one is complete)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.sources) < 2:
        p.error("give one or more sources and OUT_DIR")
    *sources, out_dir = args.sources
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        report = convert(sources, out_dir, args.samples_per_shard, args.media_root, args.force,
                         progress=not args.no_progress, metric=args.metric)
    except (FileNotFoundError, ShardError, OutputExists, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layouts = sorted(set(report.layouts.values()))
    print(f"{report.files} file(s) ({', '.join(layouts)}), {report.rows} rows: {report.samples} samples written to "
          f"{out_dir}, {sum(report.skipped.values())} skipped {dict(report.skipped) or ''} "
          f"({time.perf_counter() - start:.1f} s)")
    for line in report.first_skipped:
        print(f"skipped: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What a loader's start-up costs per sample: the saved shard indexes against the tar scan they
replace, a LLaVA ``.json`` list indexed element by element against holding it whole, and the
sampler's epoch order (docs/data.md, "Large data sets").

    python benchmarks/data_startup.py [--shards 200 --per-shard 1000] [--json-samples 200000]
        [--order-samples 10000000 --dp 8] [--reads 20000] [--json benchmarks/results/data_startup_cpu.json]

Writes ``--shards`` webdataset tars of ``--per-shard`` samples (9-character keys, a JSON and a
small image member each, as img2dataset writes them) into a temporary folder, then in a fresh
forked process each:

- ``scan (before)``: the previous ``TarSource``: every tar's headers walked (``index_tar``) and
  one Python entry held per sample;
- ``first start``: today's ``TarSource`` with no saved index: the same scan, and each shard's
  index saved to ``.casa_index/``;
- ``later start``: today's ``TarSource`` reading the saved indexes.

Reported: start-up seconds; memory the source holds (``tracemalloc``: Python allocations; the
memory-mapped index pages are the operating system's page cache, shared by every process of a
node, and given apart as bytes on disk); bytes pickled to each process worker; index lookups and
whole-sample reads per second at random positions. The tars are freshly written, so every scan
reads from the page cache: the best case for the scan (on network storage it reads every member
header from the server). Then a LLaVA ``.json`` of ``--json-samples`` two-turn samples (as
LLaVA-665K's): the whole list held as Python objects (before, LLaVA's own loader) and today's
``JsonDatasetSource`` on its first start (the list parsed, its spans saved) and a later one
(the saved spans read): start-up, memory held, peak while starting, pickled bytes. Then the sampler:
one rank's epoch order at ``--order-samples`` samples and ``--dp`` ranks, as numpy's int64
permutation kept as a view (before), as today, and as ``data.order: stateless`` (no array).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import random
import shutil
import sys
import tarfile
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_table, machine_info, run_in_child  # noqa: E402
from casa_megatron.data.shard_index import INDEX_DIR  # noqa: E402
from casa_megatron.runtime.atomic import atomic_write_json  # noqa: E402


def make_shards(folder: Path, shards: int, per_shard: int) -> list:
    annotation = b'{"conversation": [{"question": "what colour is the shape ?", "answer": "red"}]}'
    image = b"\x89PNG" + bytes(2000)
    paths = []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(per_shard):
                for ext, data in (("json", annotation), ("png", image)):
                    info = tarfile.TarInfo(f"{s:05d}{k:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


class _Before:
    """The previous TarSource's state, built by the same scan: one entry per sample."""

    def __init__(self, shards):
        from casa_megatron.data.shards import index_tar

        self.shards = [str(p) for p in shards]
        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            indexes = list(pool.map(index_tar, self.shards))
        self.samples = [(s, entry) for s, index in enumerate(indexes) for entry in index]

    def __len__(self):
        return len(self.samples)

    def key(self, i):
        return self.samples[i][1].key

    def read(self, i):
        from casa_megatron.data.shards import read_sample

        shard, entry = self.samples[i]
        return read_sample(self.shards[shard], entry)


def _measure(kind: str, shards: list, reads: int, traced: bool) -> dict:
    """Start-up time and random-access rates (``traced`` False: ``tracemalloc`` slows every
    allocation), or the memory held after start-up and after the reads (``traced``)."""
    import gc

    from casa_megatron.data.sources import TarSource

    gc.collect()
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    source = _Before(shards) if kind == "scan (before)" else TarSource(shards)
    seconds = time.perf_counter() - start
    held_start = tracemalloc.get_traced_memory()[0] if traced else None
    n = len(source)
    rng = random.Random(0)
    positions = [rng.randrange(n) for _ in range(reads)]
    t = time.perf_counter()
    for i in positions:
        source.key(i)
    lookups = reads / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in positions:
        source.read(i)
    sample_reads = reads / (time.perf_counter() - t)
    if traced:
        gc.collect()
        held_after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {"held_bytes_after_start": held_start, "held_bytes_after_reads": held_after,
                "held_bytes_per_sample": held_after / n, "pickled_bytes": len(pickle.dumps(source))}
    return {"kind": kind, "samples": n, "start_s": seconds, "start_us_per_sample": seconds / n * 1e6,
            "lookups_per_s": lookups, "reads_per_s": sample_reads}


def _json_list(kind: str, path: Path, traced: bool) -> dict:
    """Start-up time (``traced`` False: ``tracemalloc`` slows every allocation), or the memory
    held after it and at its peak (``traced``)."""
    import gc

    from casa_megatron.data.json_dataset import JsonDatasetSource

    gc.collect()
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    source = json.loads(path.read_text()) if kind == "whole list (before)" else JsonDatasetSource(path)
    seconds = time.perf_counter() - start
    n = len(source)
    if not traced:
        return {"kind": kind, "samples": n, "file_bytes": path.stat().st_size, "start_s": seconds}
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"held_bytes_per_sample": held / n, "peak_mb": peak / 1e6, "pickled_bytes": len(pickle.dumps(source))}


def _order(kind: str, n: int, world: int) -> dict:
    import numpy as np

    from casa_megatron.data.sampler import RankOrder, rank_share

    tracemalloc.start()
    start = time.perf_counter()
    if kind == "int64 permutation, view (before)":
        order = np.random.default_rng([0, 0]).permutation(n)[0::world]
        lookup = lambda p: int(order[p])  # noqa: E731
    else:
        ranks = RankOrder(n, 0, world, 0, order="stateless" if kind.startswith("stateless") else "permutation")
        lookup = lambda p: ranks.sample_at(0, p)  # noqa: E731
    first = lookup(0)
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    count = min(10000, rank_share(n, 0, world))
    t = time.perf_counter()
    for p in range(count):
        lookup(p)
    return {"kind": kind, "samples": n, "dp": world, "seconds": seconds, "peak_bytes": peak, "held_bytes": held,
            "first": first, "us_per_sample": (time.perf_counter() - t) / count * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--json-samples", type=int, default=200_000)
    parser.add_argument("--order-samples", type=int, nargs="+", default=[10_000_000, 1_000_000_000],
                        help="epoch sizes to draw one rank's order at (the int64 view of before: only up to 100M)")
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="casa_shard_index_") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        shards = make_shards(folder, args.shards, args.per_shard)
        print(f"wrote {args.shards} shards x {args.per_shard} samples in {time.perf_counter() - t:.1f} s", flush=True)
        rows = []
        for kind in ("scan (before)", "first start", "later start"):
            if kind == "first start":
                shutil.rmtree(folder / INDEX_DIR, ignore_errors=True)
            rows.append(run_in_child(_measure, kind, shards, args.reads, False, what=kind))
            print(f"  {kind}: {rows[-1]['start_s']:.2f} s", flush=True)
            if kind == "first start":
                shutil.rmtree(folder / INDEX_DIR)  # the traced run starts without them as well
            rows[-1].update(run_in_child(_measure, kind, shards, args.reads, True, what=kind))
        index_bytes = sum(p.stat().st_size for p in (folder / INDEX_DIR).iterdir())
    samples = rows[0]["samples"]
    for row in rows:
        row["index_bytes_on_disk_per_sample"] = None if row["kind"] == "scan (before)" else index_bytes / samples
    print(f"\n{samples} samples in {args.shards} shards (page-cached tars):\n")
    print(format_table(rows, [("", "kind", ""), ("start-up s", "start_s", ".2f"),
                              ("us / sample", "start_us_per_sample", ".1f"),
                              ("held B / sample", "held_bytes_per_sample", ".1f"),
                              ("index on disk B / sample", "index_bytes_on_disk_per_sample", ".1f"),
                              ("pickled bytes", "pickled_bytes", ",d"), ("lookups/s", "lookups_per_s", ",.0f"),
                              ("sample reads/s", "reads_per_s", ",.0f")]))

    with tempfile.TemporaryDirectory(prefix="casa_json_list_") as tmp:
        path = Path(tmp) / "llava.json"
        turns = [{"from": "human", "value": "<image>\nWhat is the man on the left holding, and why?"},
                 {"from": "gpt", "value": "A red umbrella: it is raining lightly in the scene."},
                 {"from": "human", "value": "Is it daytime?"}, {"from": "gpt", "value": "Yes."}]
        path.write_text(json.dumps([{"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg",
                                     "conversations": turns} for i in range(args.json_samples)]))
        lists = []
        for kind in ("whole list (before)", "first start", "later start"):
            if kind == "first start":
                shutil.rmtree(path.parent / INDEX_DIR, ignore_errors=True)
            lists.append(run_in_child(_json_list, kind, path, False, what=kind))
            if kind == "first start":
                shutil.rmtree(path.parent / INDEX_DIR)  # the traced run starts without the saved spans too
            lists[-1].update(run_in_child(_json_list, kind, path, True, what=kind))
    print(f"\nLLaVA .json, {args.json_samples:,} samples ({lists[0]['file_bytes'] / 1e6:.0f} MB):\n")
    print(format_table(lists, [("", "kind", ""), ("start-up s", "start_s", ".2f"),
                               ("held B / sample", "held_bytes_per_sample", ".1f"), ("peak MB", "peak_mb", ".0f"),
                               ("pickled bytes", "pickled_bytes", ",d")]))

    orders = []
    for n in args.order_samples:
        kinds = ("int64 permutation, view (before)",) if n <= 100_000_000 else ()
        drawn = [run_in_child(_order, kind, n, args.dp, what=kind)
                 for kind in kinds + ("today", "stateless (data.order)")]
        if kinds and drawn[0]["first"] != drawn[1]["first"]:
            raise RuntimeError("the two permutation orders differ")
        orders += drawn
    for row in orders:
        row["peak_mb"], row["held_mb"] = row["peak_bytes"] / 1e6, row["held_bytes"] / 1e6
    print(f"\none rank's epoch order, dp={args.dp}:\n")
    print(format_table(orders, [("", "kind", ""), ("samples", "samples", ",d"), ("seconds to the first sample", "seconds", ".3f"),
                                ("peak MB", "peak_mb", ".1f"), ("held MB", "held_mb", ".1f"),
                                ("us / later sample", "us_per_sample", ".2f")]))
    if args.json:
        atomic_write_json(args.json, {"machine": machine_info(), "command": " ".join(sys.argv),
                                      "shards": args.shards, "per_shard": args.per_shard, "sources": rows, "json_list": lists,
                                      "epoch_order": orders, "method": __doc__.split("\n\n", 2)[2]})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

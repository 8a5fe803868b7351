#!/usr/bin/env python3
"""Cut downloaded files into pieces that fit one device call, and join them back on the device.

    python3 tools/gpu/pack.py pack DIR [--piece-mib 58] [--budget-mib 60]
        DIR/wheels/<bundle>/<file>  ->  DIR/call-1 ... DIR/call-N (pieces + a copy of MANIFEST)
    python3 tools/gpu/pack.py join STORE OUT [--bundles core,te]
        STORE holds the pieces of every call (copied there call by call) -> OUT/<file>,
        each checked against MANIFEST's size and sha256; a missing or damaged piece is named.

Why pieces and folders: a device call carries at most 64 MiB (the repository included, ~2 MiB),
and the machine is given back 30 s after a call ends, so the pieces are moved to a store outside
the repository at the start of each call and the calls follow each other at once. Bundles are
packed in order ("core" before "te"), filling each folder before opening the next, so the
first calls complete the first bundle and a session can install it before carrying the rest.

MANIFEST lines: ``bundle name size sha256 pieces``. Only Python's standard library is used: the
same script runs on the CPU machine and on the GPU machine.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

BUNDLE_ORDER = ("core", "te")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundles(wheels: Path):
    names = [p.name for p in sorted(wheels.iterdir()) if p.is_dir()]
    return sorted(names, key=lambda n: (BUNDLE_ORDER.index(n) if n in BUNDLE_ORDER else len(BUNDLE_ORDER), n))


def pack(directory: Path, piece: int, budget: int) -> list:
    """Returns [(call folder, bytes)]. Pieces are named ``<file>.piece-KK``."""
    if piece > budget:
        raise SystemExit(f"a piece ({piece} B) must fit a call folder ({budget} B)")
    wheels = directory / "wheels"
    if not wheels.is_dir():
        raise SystemExit(f"{wheels} does not exist: run tools/gpu/fetch.sh first")
    for old in directory.glob("call-*"):
        shutil.rmtree(old)
    manifest, items = [], []  # items: (size, piece name, source, offset)
    for bundle in _bundles(wheels):
        for f in sorted(p for p in (wheels / bundle).iterdir() if p.is_file()):
            size = f.stat().st_size
            offsets = list(range(0, size, piece)) or [0]
            manifest.append(f"{bundle} {f.name} {size} {sha256(f)} {len(offsets)}")
            items += [(min(piece, size - off), f"{f.name}.piece-{k:02d}", f, off) for k, off in enumerate(offsets)]
    folders = []  # [used bytes, items]; fill in order, a new folder when the next piece does not fit
    for item in items:
        fitting = next((f for f in folders if f[0] + item[0] <= budget), None)
        if fitting is None:
            fitting = [0, []]
            folders.append(fitting)
        fitting[0] += item[0]
        fitting[1].append(item)
    text = "\n".join(manifest) + "\n"
    (directory / "MANIFEST").write_text(text)
    out = []
    for i, (used, content) in enumerate(folders, 1):
        folder = directory / f"call-{i}"
        folder.mkdir()
        for size, name, src, off in content:
            with open(src, "rb") as s, open(folder / name, "wb") as t:
                s.seek(off)
                t.write(s.read(size))
        (folder / "MANIFEST").write_text(text)
        out.append((folder, used))
    return out


def bundle_completion(directory: Path) -> dict:
    """bundle -> the call after which all its pieces have been carried."""
    where = {p.name: int(f.name.split("-")[1]) for f in directory.glob("call-*") for p in f.iterdir()}
    last = {}
    for line in (directory / "MANIFEST").read_text().split("\n"):
        if line.strip():
            bundle, name, _, _, pieces = line.split()
            calls = [where[f"{name}.piece-{k:02d}"] for k in range(int(pieces))]
            last[bundle] = max(last.get(bundle, 0), *calls)
    return last


def join(store: Path, out: Path, bundles=None) -> list:
    """Join and verify every file of ``bundles`` (default: all in MANIFEST); returns the paths."""
    manifest = store / "MANIFEST"
    if not manifest.exists():
        raise SystemExit(f"{manifest} is missing: copy a call folder's MANIFEST into the store")
    out.mkdir(parents=True, exist_ok=True)
    joined = []
    for line in manifest.read_text().split("\n"):
        if not line.strip():
            continue
        bundle, name, size, digest, pieces = line.split()
        if bundles and bundle not in bundles:
            continue
        parts = [store / f"{name}.piece-{k:02d}" for k in range(int(pieces))]
        missing = [p.name for p in parts if not p.exists()]
        if missing:
            raise SystemExit(f"{name}: missing pieces {missing} (a call was skipped, or the machine was "
                             f"given back between calls: the store is gone, start again)")
        target = out / name
        with open(target, "wb") as t:
            for p in parts:
                with open(p, "rb") as s:
                    shutil.copyfileobj(s, t, 1 << 20)
        if target.stat().st_size != int(size) or sha256(target) != digest:
            raise SystemExit(f"{name}: size or sha256 differs from MANIFEST (a damaged piece)")
        joined.append(target)
    return joined


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dir", type=Path)
    p.add_argument("--piece-mib", type=float, default=58)
    p.add_argument("--budget-mib", type=float, default=60)
    j = sub.add_parser("join")
    j.add_argument("store", type=Path)
    j.add_argument("out", type=Path)
    j.add_argument("--bundles", default="", help="comma-separated bundles to join (default: all)")
    args = parser.parse_args(argv)
    if args.verb == "pack":
        folders = pack(args.dir, int(args.piece_mib * 2**20), int(args.budget_mib * 2**20))
        print(f"{len(folders)} call folders in {args.dir}: "
              + ", ".join(f"{f.name} {used / 2**20:.1f} MiB" for f, used in folders))
        for bundle, last in bundle_completion(args.dir).items():
            print(f"bundle {bundle!r} is complete after call {last}")
    else:
        files = join(args.store, args.out, [b for b in args.bundles.split(",") if b])
        print(f"joined and verified {len(files)} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cut downloaded files into pieces that fit one device call, and join them back on the device.

    python3 tools/gpu/pack.py pack DIR [--piece-mib M] [--budget-mib B]
        DIR/wheels/<bundle>/<file>  ->  DIR/<round>/call-1 ... call-N (pieces + a copy of MANIFEST)
    python3 tools/gpu/pack.py join STORE OUT [--bundles core,te]
        STORE holds the pieces of every call (copied there call by call) -> OUT/<file>,
        each checked against MANIFEST's size and sha256; a missing or damaged piece is named.
    python3 tools/gpu/pack.py travel REPO
        the bytes a device call sends besides its carried folders (the repository's tracked and
        untracked-not-ignored files), and the call-folder budget that leaves (docs/gpu.md)

Why pieces, folders and rounds: a device call carries at most 64 MiB, the repository included
(5.5 MiB on 2026-12-06, most of it benchmark results), a lent machine is given back 30 s after a
call ends, and a session is lent 15 device minutes in all, the machine's start included. So the
packages travel in **rounds**, one round per lent session, each round complete in itself (the core
bundle is packed into every round: 2.5 MB): ``core`` (megatron-core: one call), ``dali`` (DALI and
PyAV) and ``te`` (Transformer Engine). Within a round the pieces are moved to a store outside the
repository at the start of each call, and the calls follow each other at once.

MANIFEST lines: ``bundle name size sha256 pieces``. Only Python's standard library is used: the
same script runs on the CPU machine and on the GPU machine.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 2**20
CALL_LIMIT = 64 * MIB  # the device tool's limit on what one call sends (repository + carried paths)
MARGIN = 256 * 1024  # the MANIFEST (2 KB), and small edits a session makes between packing and its calls
# Each round is one lent session's work (docs/gpu.md "Rounds"); its bundles are packed in this order.
ROUNDS = {"core": ("core",), "dali": ("core", "dali"), "te": ("core", "te")}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def travelling_bytes(repo: Path) -> int:
    """What every device call sends besides ``carry``: tracked files and untracked files git does
    not ignore (the device tool's rule), as they are on disk now."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = {repo / name.decode() for name in listed if name}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def call_budget(repo: Path) -> int:
    """Bytes left for one call's carried folder: the limit minus the repository and a margin."""
    budget = CALL_LIMIT - travelling_bytes(repo) - MARGIN
    if budget < 8 * MIB:
        raise SystemExit(f"the repository sends {travelling_bytes(repo) / MIB:.1f} MiB with every device call: "
                         f"too little is left of {CALL_LIMIT // MIB} MiB for the packages")
    return budget


def _files(wheels: Path) -> list:
    """[(bundle, file)] for every downloaded file, bundles and files in name order."""
    return [(bundle.name, f) for bundle in sorted(wheels.iterdir()) if bundle.is_dir()
            for f in sorted(p for p in bundle.iterdir() if p.is_file())]


def _cut(files: list, piece: int, budget: int) -> tuple:
    """Cut ``files`` into pieces that fill each call folder to ``budget`` before the next one
    opens (a file's pieces may differ in size); returns (MANIFEST lines, [[(size, piece name,
    source, offset)] per folder])."""
    manifest, folders, room = [], [], 0
    for bundle, f in files:
        size, offset, k = f.stat().st_size, 0, 0
        while offset < size or k == 0:
            if room == 0:
                folders.append([])
                room = budget
            n = min(room, piece, size - offset)
            folders[-1].append((n, f"{f.name}.piece-{k:02d}", f, offset))
            offset, room, k = offset + n, room - n, k + 1
        manifest.append(f"{bundle} {f.name} {size} {sha256(f)} {k}")
    return manifest, folders


def pack(directory: Path, piece: int, budget: int) -> dict:
    """Returns {round: [(call folder, bytes)]}: ``DIR/<round>/call-K`` holds pieces named
    ``<file>.piece-KK`` and the round's MANIFEST; a round's bundles are cut in order, each folder
    filled to ``budget`` before the next one opens."""
    if piece > budget:
        raise SystemExit(f"a piece ({piece} B) must fit a call folder ({budget} B)")
    wheels = directory / "wheels"
    if not wheels.is_dir():
        raise SystemExit(f"{wheels} does not exist: run tools/gpu/fetch.sh first")
    for old in [*directory.glob("call-*"), *(directory / r for r in ROUNDS)]:
        if old.is_dir():
            shutil.rmtree(old)
    files = _files(wheels)
    unknown = {b for b, _ in files} - {b for bundles in ROUNDS.values() for b in bundles}
    if unknown:
        raise SystemExit(f"bundles {sorted(unknown)} belong to no round (pack.py ROUNDS)")
    out = {}
    for name, bundles in ROUNDS.items():
        chosen = [(b, f) for b in bundles for bb, f in files if bb == b]
        extra = {b for b, _ in chosen} - {"core"}
        if not chosen or (len(bundles) > 1 and not extra):
            continue  # nothing of this round was downloaded (PACKAGES_TE="", say)
        manifest, folders = _cut(chosen, piece, budget)
        text = "\n".join(manifest) + "\n"
        (directory / name).mkdir()
        (directory / name / "MANIFEST").write_text(text)
        out[name] = []
        for i, content in enumerate(folders, 1):
            folder = directory / name / f"call-{i}"
            folder.mkdir()
            for size, piece_name, src, off in content:
                with open(src, "rb") as s, open(folder / piece_name, "wb") as t:
                    s.seek(off)
                    t.write(s.read(size))
            (folder / "MANIFEST").write_text(text)
            out[name].append((folder, sum(item[0] for item in content)))
    return out


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
                             f"given back between calls: the store is gone, start the round again)")
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
    p.add_argument("--piece-mib", type=float, default=None, help="largest piece (default: the folder budget)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="bytes per call folder (default: 64 MiB less the repository that travels, less 256 KiB)")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    j = sub.add_parser("join")
    j.add_argument("store", type=Path)
    j.add_argument("out", type=Path)
    j.add_argument("--bundles", default="", help="comma-separated bundles to join (default: all)")
    t = sub.add_parser("travel")
    t.add_argument("repo", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        budget = int(args.budget_mib * MIB) if args.budget_mib else call_budget(args.repo)
        piece = int(args.piece_mib * MIB) if args.piece_mib else budget
        rounds = pack(args.dir, piece, budget)
        print(f"call folders of at most {budget / MIB:.1f} MiB (pieces of {piece / MIB:.1f} MiB):")
        for name, folders in rounds.items():
            print(f"round {name!r}: {len(folders)} call(s): "
                  + ", ".join(f"{name}/{f.name} {used / MIB:.1f} MiB" for f, used in folders))
    elif args.verb == "travel":
        sent = travelling_bytes(args.repo)
        print(f"{sent / MIB:.2f} MiB travel with every call; call folders may hold "
              f"{(CALL_LIMIT - sent - MARGIN) / MIB:.1f} MiB ({math.floor(CALL_LIMIT / MIB)} MiB limit, {MARGIN / 1024:.0f} KiB margin)")
    else:
        files = join(args.store, args.out, [b for b in args.bundles.split(",") if b])
        print(f"joined and verified {len(files)} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

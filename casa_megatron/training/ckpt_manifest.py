"""Completeness and integrity of one checkpoint directory: ``manifest.json``, written last.

A checkpoint is complete when its directory has its final name (``iter_N``, renamed from
``iter_N.tmp`` after every rank finished) *and* holds a manifest listing every file with its
size and CRC-32. The manifest is the last file written before the rename, so a save killed at
any point leaves either no ``iter_N`` or one without a manifest (not trusted). At load time the
files are checked against it: a truncated ``.distcp`` or a flipped byte in ``trainer.pt`` is
reported by path instead of surfacing as a bare ``EOFError`` or an "another architecture"
message from megatron.

Cost: CRC-32 runs at ~4 GB/s per core (zlib, measured on this machine). Files are split over
ranks (``__<rank>_<i>.distcp`` to the rank that wrote it, the rest to rank 0), so every rank
reads back about its own share: the files it just wrote, usually still in the page cache.
``checkpoint.verify=size`` checks sizes only (for file systems where reading back is slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from casa_megatron.runtime.atomic import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 16 * 2**20
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _owner(name: str, world: int) -> int:
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match and int(match.group(1)) < world else 0


def _mine(names: List[str]) -> List[str]:
    rank, world = _world()
    return [n for n in names if _owner(n, world) == rank]


def _gather(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _files(directory: Path) -> List[str]:
    """Every regular file under ``directory`` (relative, sorted), the manifest excluded."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def describe(directory: Path, names: List[str], checksums: bool = True) -> Dict[str, dict]:
    """{name: size and CRC-32 (unless ``checksums`` is False)} of these files of ``directory``."""
    entries = {}
    for name in names:
        path = directory / name
        entries[name] = {"size": path.stat().st_size, **({"crc32": crc32(path)} if checksums else {})}
    return entries


def shards_of(directory: Path, rank: int) -> List[str]:
    """The ``__<rank>_<i>.distcp`` files ``rank`` wrote into ``directory`` (the files it describes)."""
    return [n for n in _files(directory) if (m := _RANK_FILE.match(n)) and int(m.group(1)) == rank]


def write_manifest(directory: Path, step: int, checksums: bool = True,
                   described: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """Collective: describe every file of ``directory`` (sizes, CRC-32 unless ``checksums`` is
    False); rank 0 writes ``manifest.json`` atomically. Call after every rank finished writing.
    ``described``: entries this rank computed already (a background writer checksums the shards
    it has just written: training/checkpoint_async.py)."""
    described = described or {}
    names = _files(directory)
    mine = _mine(names)
    entries = {**{n: described[n] for n in mine if n in described},
               **describe(directory, [n for n in mine if n not in described], checksums)}
    merged: Dict[str, dict] = {}
    for part in _gather(entries):
        merged.update(part)
    if _world()[0] == 0:
        missing = sorted(set(names) - set(merged))
        if missing:
            raise RuntimeError(f"checkpoint {directory}: no rank described {missing}")
        atomic_write_json(directory / MANIFEST, {"format": FORMAT, "step": step, "files": merged}, indent=1,
                          sort_keys=True)
    return merged


def read_manifest(directory: Path) -> Optional[dict]:
    """The manifest, or None if there is none; raises ValueError if it is unreadable."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    return manifest


def manifest_digest(directory: Path) -> Optional[str]:
    """SHA-256 of a checkpoint's ``manifest.json`` (every file's size and CRC-32): the same for the
    same checkpoint wherever it is copied or mounted, so results can name the checkpoint they
    scored (``casa-eval``'s ``checkpoint_digest``, checked by ``export-hf --eval-results``). None
    without a manifest (an import folder)."""
    path = directory / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_files(directory: Path, checksums: bool = True) -> Optional[str]:
    """Collective: None if every file listed in the manifest is there with its size (and CRC-32),
    else the first problem, naming the file (the same answer on every rank).

    A directory without a manifest is reported as incomplete."""
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        problem: Optional[str] = str(exc)
        manifest = None
    else:
        problem = None if manifest is not None else f"{directory} has no {MANIFEST} (save never finished)"
    problems = []
    if manifest is not None:
        files = manifest["files"]
        for name in _mine(sorted(files)):
            problems.append(_check_one(directory / name, files[name], checksums))
    gathered = [p for part in _gather([p for p in problems if p]) for p in part]
    return problem or (gathered[0] if gathered else None)


def _check_one(path: Path, entry: dict, checksums: bool) -> Optional[str]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read ({exc})"
    if size != entry.get("size"):
        return f"{path} has {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
    if checksums and "crc32" in entry:
        try:
            value = crc32(path)
        except OSError as exc:
            return f"{path} cannot be read ({exc})"
        if value != entry["crc32"]:
            return f"{path} is corrupt (CRC-32 {value:08x}, the manifest says {entry['crc32']:08x})"
    return None

"""Tar shards in the webdataset convention: ``<key>.<ext>`` members, consecutive members with the
same key form one sample (``000123.mp4`` + ``000123.json``).

We index a shard by scanning its tar headers once (cheap: no member data is read; the index is
kept in a compact file beside the shards, ``shard_index.py``) and then read any sample by
seeking to its members. Random access is what makes the loader simple: the epoch
order is a seeded permutation of sample indices, split across data-parallel ranks, and
resuming is "continue at position i" without replaying a stream. Shards are written with fixed
metadata (mtime 0, uid 0) so the same inputs give byte-identical tars.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from casa_megatron.data.records import RawSample, SampleError, ShardError

BLOCK = tarfile.BLOCKSIZE  # 512
logger = logging.getLogger(__name__)


def split_key(name: str) -> Tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return "", ""
    return (f"{head}/{stem}" if head else stem), ext


@dataclass
class IndexedSample:
    key: str
    parts: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)


def index_tar(path: str | Path) -> List[IndexedSample]:
    """Samples of one shard. A truncated or damaged tar keeps the samples before the damage
    (minus the last one, which may be missing parts) and is named in a warning; a shard with
    none raises ShardError naming it."""
    samples, problem = scan_tar(path)
    if problem:
        warn_damaged(path, problem, len(samples))
    return samples


def warn_damaged(path: str | Path, problem: str, kept: int) -> None:
    logger.warning("shard %s is damaged (%s); using its first %d samples", path, problem, kept)


def scan_tar(path: str | Path) -> Tuple[List[IndexedSample], Optional[str]]:
    """Walk a shard's member headers (no member data is read): its samples, and the damage
    found (None for an intact shard). ShardError when nothing is readable.

    A tar cut exactly between two members reads like a shorter, valid tar (``tarfile`` stops at
    the missing header without complaint); what gives it away is the missing end-of-archive
    marker, two zero blocks after the last member, which every tar writer emits."""
    path = str(path)
    samples: List[IndexedSample] = []
    problem: Optional[str] = None
    end = 0  # byte after the last member's (512-padded) data
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if member.offset_data + member.size > file_size:
                    problem = f"member {member.name!r} is cut off at byte {file_size}"
                    break
                end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not key:
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(IndexedSample(key))
                samples[-1].parts[ext] = (member.offset_data, member.size)
        if problem is None and end:
            problem = _end_marker_problem(path, end, file_size)
    except (tarfile.TarError, EOFError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem and samples:
        samples.pop()  # the sample at the damage may be missing parts: not trusted
    if not samples:
        raise ShardError(f"shard {path}: nothing readable ({problem or 'no <key>.<ext> members'})")
    return samples, problem


def _end_marker_problem(path: str, end: int, file_size: int) -> Optional[str]:
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(2 * BLOCK)
    if len(tail) < 2 * BLOCK or tail.count(0) != len(tail):
        return (f"no end-of-archive marker after the last complete member at byte {end} (file size "
                f"{file_size}): the file was cut, the members after it are lost")
    return None


def read_sample(path: str, entry: IndexedSample) -> RawSample:
    parts = {}
    try:
        with open(path, "rb") as f:
            for ext, (offset, size) in entry.parts.items():
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError("truncated_shard", f"{entry.key} in {path}: .{ext} is cut off")
                parts[ext] = data
    except OSError as e:
        raise SampleError("unreadable_shard", f"{entry.key} in {path}: {e}") from e
    return RawSample(entry.key, path, parts)


class ShardWriter:
    """Write samples into ``<out_dir>/<prefix>-000000.tar``, ``samples_per_shard`` per tar."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int, prefix: str = "shard"):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.paths: List[Path] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def write(self, key: str, parts: Dict[str, bytes]) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must not contain a dot in its last component")
        if self._tar is None or self._count == self.samples_per_shard:
            self._open_next()
        for ext in sorted(parts):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(parts[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(parts[ext]))
        self._count += 1

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

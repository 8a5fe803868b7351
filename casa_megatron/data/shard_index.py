"""A compact index of each tar shard, saved beside the shards and memory-mapped when read.

Why: a loader needs, for every sample, its key and where its members sit in the tar. Walking
every member header of every shard at start-up, on every rank, and holding a Python object per
sample cost 22.1 s and 703 bytes per sample for 200,000 samples in page-cached shards (measured,
``benchmarks/data_startup.py``): about 19 minutes and 7 GB per rank at 10 million samples before
the first step, and the whole index pickled to every process worker. Each shard's index is
therefore built once (by ``build_shards``, ``tools/index_shards.py``, or the first loader that
finds none) and saved in ``<shard folder>/.casa_index/<shard name>.idx``. Start-up then reads
one small header per shard (0.02 s for those 200,000 samples); a sample's entry is looked up in
the memory-mapped file, whose pages the operating system shares among every process of a node;
a source holds, and pickles, O(shards) memory (6 bytes per sample measured, 11.7 KB pickled).

File layout (little endian): the magic ``CASAIDX1``, the header's length (uint64), the header as
JSON padded to 8 bytes (format, the tar's size and mtime it was built from, the counts, the
extension table, the damage ``scan_tar`` found), then five arrays, each 8-aligned: per sample the
end of its key in the key blob and the end of its members (int64 ``[n]``), per member its
extension's number (int32 ``[m]``), data offset and size (int64 ``[m]``), then the keys (UTF-8).

An index is used only when it matches its tar: another size or modification time (the shard was
rewritten), another format, a wrong magic or a cut file make it rebuilt from the tar, with a log
line saying why. Where the data folder cannot be written (a read-only dataset), ``data.index_dir``
(Megatron-LM's ``--data-cache-path``) names a folder the indexes are saved in instead
(``index_files``: an index beside the data is still read first, so indexes shipped with a
dataset are used); without it the index is kept in memory, still compact (~40 bytes per sample
plus the keys), and rebuilt at every start.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from casa_megatron.data.locations import files_in
from casa_megatron.data.shards import IndexedSample, scan_tar
from casa_megatron.runtime.atomic import atomic_write

logger = logging.getLogger(__name__)

MAGIC = b"CASAIDX1"
FORMAT = 1
INDEX_DIR = ".casa_index"
_LEN = struct.Struct("<Q")
Buffer = Union[bytes, mmap.mmap]


def index_path(shard: Union[str, Path]) -> Path:
    """Where a shard's index lives beside it: ``<folder>/.casa_index/<name>.idx`` (hidden: a
    loader reads every ``*.tar`` of a folder, and this keeps the folder's listing as the user made it)."""
    return index_files(shard, None)[0]


def cached_path(data_file: Union[str, Path], index_dir: Union[str, Path], suffix: str) -> Path:
    """Where the index of ``data_file`` lives under ``index_dir``: one folder per data folder,
    named by the folder's name and a digest of its absolute path (two datasets with folders of
    the same name do not meet), then ``<file name><suffix>`` as beside the data."""
    data_file = Path(data_file).resolve()
    digest = hashlib.sha256(str(data_file.parent).encode()).hexdigest()[:16]
    return Path(index_dir) / f"{data_file.parent.name or 'root'}-{digest}" / f"{data_file.name}{suffix}"


def index_files(data_file: Union[str, Path], index_dir: Optional[Union[str, Path]],
                suffix: str = ".idx") -> List[Path]:
    """Where an index of ``data_file`` is looked for, in order: beside the data, then under
    ``index_dir`` if one is given. The last one is where a new index is saved."""
    data_file = Path(data_file)
    here = data_file.parent / INDEX_DIR / f"{data_file.name}{suffix}"
    return [here, cached_path(data_file, index_dir, suffix)] if index_dir else [here]


@dataclass(frozen=True)
class TarStamp:
    """What the index was built from: a rewritten shard differs in one of them."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, shard: Union[str, Path]) -> "TarStamp":
        st = os.stat(shard)
        return cls(st.st_size, st.st_mtime_ns)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


class ShardIndex:
    """One shard's samples, read from a buffer in the file layout above (bytes or a mmap)."""

    def __init__(self, buffer: Buffer, where: str = "<memory>"):
        self.buffer = buffer
        self.header = read_header(buffer, where, len(buffer))
        n, m = self.header["samples"], self.header["members"]
        offset = 8 + _LEN.size + self.header["header_bytes"]
        view = memoryview(buffer)
        arrays = []
        for code, count in (("q", n), ("q", n), ("i", m), ("q", m), ("q", m)):
            size = struct.calcsize(code) * count
            arrays.append(_little_endian(view[offset:offset + size], code))
            offset += _pad8(size)
        # plain memoryviews: indexing one gives a Python int in tens of nanoseconds (a numpy
        # scalar takes microseconds, and a loader looks up every sample it reads)
        self.key_end, self.member_end, self.member_ext, self.member_offset, self.member_size = arrays
        self.keys = view[offset:offset + self.header["key_bytes"]]
        self.exts: List[str] = self.header["exts"]
        self.problem: Optional[str] = self.header["problem"]

    def __len__(self) -> int:
        return self.header["samples"]

    def key(self, i: int) -> str:
        return bytes(self.keys[self.key_end[i - 1] if i else 0:self.key_end[i]]).decode("utf-8")

    def entry(self, i: int) -> IndexedSample:
        """Sample ``i`` as ``scan_tar`` gave it: its key and {ext: (data offset, size)} in tar order."""
        first, end = (self.member_end[i - 1] if i else 0), self.member_end[i]
        return IndexedSample(self.key(i), {self.exts[self.member_ext[j]]: (self.member_offset[j], self.member_size[j])
                                           for j in range(first, end)})

    def __reduce__(self):  # an index held in memory travels to worker processes as its bytes
        return ShardIndex, (bytes(self.buffer),)


def _little_endian(view: memoryview, code: str):
    """The file's little-endian numbers as an indexable sequence (a view on little-endian hosts)."""
    if sys.byteorder == "little":
        return view.cast(code)
    values = array.array(code, bytes(view))
    values.byteswap()
    return values


def encode(samples: Sequence[IndexedSample], problem: Optional[str], stamp: TarStamp) -> bytes:
    """The file layout above for ``scan_tar``'s result."""
    exts: List[str] = []
    ext_number = {}
    key_end, member_end, member_ext, member_offset, member_size = [], [], [], [], []
    keys = bytearray()
    for sample in samples:
        keys += sample.key.encode("utf-8")
        key_end.append(len(keys))
        for ext, (offset, size) in sample.parts.items():
            if ext not in ext_number:
                ext_number[ext] = len(exts)
                exts.append(ext)
            member_ext.append(ext_number[ext])
            member_offset.append(offset)
            member_size.append(size)
        member_end.append(len(member_ext))
    header = {"format": FORMAT, "tar_size": stamp.size, "tar_mtime_ns": stamp.mtime_ns, "samples": len(samples),
              "members": len(member_ext), "key_bytes": len(keys), "exts": exts, "problem": problem}
    body = bytearray()
    for values, dtype in ((key_end, "<i8"), (member_end, "<i8"), (member_ext, "<i4"), (member_offset, "<i8"),
                          (member_size, "<i8")):
        raw = np.asarray(values, dtype=dtype).tobytes()
        body += raw + bytes(_pad8(len(raw)) - len(raw))
    body += keys
    text = json.dumps(header).encode()
    text += b" " * (_pad8(len(text)) - len(text))
    return MAGIC + _LEN.pack(len(text)) + text + bytes(body)


class StaleIndex(ValueError):
    """An index file that must not be used (why in the message): it is rebuilt from the tar."""


def read_header(buffer: Buffer, where: str, file_size: int) -> dict:
    """The header of an index file, checked against the file's own size."""
    if len(buffer) < 8 + _LEN.size or bytes(buffer[:8]) != MAGIC:
        raise StaleIndex(f"{where}: not a shard index (no {MAGIC!r} magic)")
    (length,) = _LEN.unpack(bytes(buffer[8:8 + _LEN.size]))
    try:
        header = json.loads(bytes(buffer[8 + _LEN.size:8 + _LEN.size + length]))
    except ValueError as e:
        raise StaleIndex(f"{where}: unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StaleIndex(f"{where}: index format {header.get('format') if isinstance(header, dict) else None} "
                         f"(this version reads {FORMAT})")
    try:
        n, m = int(header["samples"]), int(header["members"])
        key_bytes, exts, problem = int(header["key_bytes"]), header["exts"], header["problem"]
        int(header["tar_size"]), int(header["tar_mtime_ns"])
    except (KeyError, TypeError, ValueError) as e:
        raise StaleIndex(f"{where}: incomplete header ({type(e).__name__}: {e})") from None
    if not isinstance(exts, list) or not (problem is None or isinstance(problem, str)):
        raise StaleIndex(f"{where}: malformed header (exts {exts!r}, problem {problem!r})")
    expected = 8 + _LEN.size + length + 2 * _pad8(8 * n) + _pad8(4 * m) + 2 * _pad8(8 * m) + key_bytes
    if file_size != expected:
        raise StaleIndex(f"{where}: {file_size} bytes where its header describes {expected} (a cut or damaged file)")
    header["header_bytes"] = length
    return header


def probe(shard: Union[str, Path], path: Optional[Path] = None) -> dict:
    """The header of a shard's saved index (``path``; default beside the shard: ``samples``,
    ``problem``, ...), reading the header only; ``StaleIndex`` (or ``OSError``: none saved) when it
    cannot be used for the shard as it is now."""
    path = Path(path) if path else index_path(shard)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(8 + _LEN.size)
        if len(head) == 8 + _LEN.size and head[:8] == MAGIC:
            head += f.read(_LEN.unpack(head[8:])[0])
    header = read_header(head, str(path), file_size)
    _check_stamp(header, shard, path)
    return header


def _check_stamp(header: dict, shard: Union[str, Path], where: Path) -> None:
    stamp = TarStamp.of(shard)
    built = TarStamp(header["tar_size"], header["tar_mtime_ns"])
    if built != stamp:
        raise StaleIndex(f"{where}: built from {shard} as it was (size {built.size}, mtime_ns {built.mtime_ns}); "
                         f"it is now size {stamp.size}, mtime_ns {stamp.mtime_ns}")


def open_saved(shard: Union[str, Path], path: Optional[Path] = None) -> ShardIndex:
    """A shard's saved index (at ``path``, default beside it), memory-mapped (``StaleIndex`` /
    ``OSError`` as ``probe``)."""
    path = Path(path) if path else index_path(shard)
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    index = ShardIndex(buffer, str(path))
    _check_stamp(index.header, shard, path)
    return index


def build(shard: Union[str, Path], save: bool = True,
          index_dir: Optional[Union[str, Path]] = None) -> Tuple[ShardIndex, Optional[Path]]:
    """Index a shard from its tar headers (``scan_tar``; ``ShardError`` if nothing is readable)
    and save the index atomically beside it, or under ``index_dir`` when one is given. Returns
    the index and where it was saved (None where that cannot be written: the index is then kept
    in memory)."""
    stamp = TarStamp.of(shard)
    samples, problem = scan_tar(shard)
    data = encode(samples, problem, stamp)
    saved = None
    if save:
        target = index_files(shard, index_dir)[-1]
        try:
            saved = atomic_write(target, lambda tmp: tmp.write_bytes(data))
        except OSError as e:
            logger.debug("cannot save the index of %s in %s (%s): kept in memory", shard, target, e)
    return ShardIndex(data, f"index of {shard}"), saved


@dataclass
class Current:
    """A shard's index as it stands once ``ensure`` has run."""

    samples: int
    problem: Optional[str]  # the damage the index records (None: an intact shard)
    built: bool  # scanned now (none was saved, or the saved one was stale)
    in_memory: Optional[ShardIndex] = None  # built but not saved (the folder cannot be written)
    path: Optional[Path] = None  # the saved index (None: in memory)


T = TypeVar("T")


def find_current(places: Sequence[Path], read: Callable[[Path], T], what: str,
                 data_file: Union[str, Path]) -> Optional[Tuple[Path, T]]:
    """``(where, read(where))`` for the first of ``places`` holding a current index, else None,
    with one INFO line saying why each saved one was stale (``rebuilding <what> of <file>: ...``)."""
    stale = []
    for where in places:
        try:
            return where, read(where)
        except FileNotFoundError:
            pass
        except (StaleIndex, OSError) as e:
            stale.append(str(e))
    if stale:
        logger.info("rebuilding %s of %s: %s", what, data_file, "; ".join(stale))
    return None


def ensure(shard: Union[str, Path], rebuild: bool = False,
           index_dir: Optional[Union[str, Path]] = None) -> Current:
    """The shard's saved index when one is current (beside it, then under ``index_dir``; its
    header only is read), else a new one built and saved (``rebuild``: always; ``index_files``
    says where); ``ShardError`` when the tar has nothing readable."""
    found = None if rebuild else find_current(index_files(shard, index_dir), lambda p: probe(shard, p),
                                              "the index", shard)
    if found is not None:
        path, header = found
        return Current(header["samples"], header["problem"], False, path=path)
    index, saved = build(shard, index_dir=index_dir)
    return Current(len(index), index.problem, True, None if saved else index, saved)


@dataclass
class IndexReport:
    """What ``index_shards`` did, shard by shard."""

    shards: int = 0
    samples: int = 0
    built: int = 0  # indexed now (none saved, or the saved one was stale)
    up_to_date: int = 0
    damaged: List[str] = field(default_factory=list)  # "<shard>: <problem>"
    failed: List[str] = field(default_factory=list)  # "<shard>: <error>": nothing readable, or not saved


def shard_paths(locations: Sequence[Union[str, Path]]) -> List[Path]:
    """Every ``*.tar`` of the folders given (sorted by name, as a loader reads them) and the tars given."""
    return files_in(locations, ".tar")


def index_shards(shards: Sequence[Union[str, Path]], threads: int = 8, rebuild: bool = False,
                 progress: bool = True, index_dir: Optional[Union[str, Path]] = None) -> IndexReport:
    """Save the index of every shard whose saved index is missing or stale (all with ``rebuild``),
    in ``threads`` threads, with a progress bar: what a data set's owner runs once, so that no
    training start scans a tar (``index_dir``: as ``ensure``)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from casa_megatron.data.records import ShardError

    def one(shard: Path):
        try:
            now = ensure(shard, rebuild, index_dir)
        except (ShardError, OSError) as e:  # named in the report; the loader refuses the shard later
            return shard, 0, None, False, str(e)
        unsaved = f"could not write {index_files(shard, index_dir)[-1]}" if now.in_memory is not None else None
        return shard, now.samples, now.problem, now.built, unsaved

    report = IndexReport(shards=len(shards))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard, count, problem, built, error in tqdm(pool.map(one, map(Path, shards)), total=len(shards),
                                                       desc="index", unit="shard", disable=not progress):
            report.samples += count
            report.built += built and error is None
            report.up_to_date += not built and error is None
            if problem:
                report.damaged.append(f"{shard}: {problem}")
            if error:
                report.failed.append(f"{shard}: {error}")
    return report


def shards_of(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """The tar shards behind data sources (folders of shards and single tars; other kinds of
    source, and paths that do not exist, are left to the loader to read or to refuse)."""
    return files_in(paths, ".tar", strict=False)

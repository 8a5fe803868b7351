"""The byte span of every sample of a JSON dataset, saved beside it so that later starts skip the scan.

Why: a ``.json`` list is parsed element by element to find its samples (``json_dataset.py``),
and a ``.jsonl`` read line by line; LLaVA-OneVision ships single files of millions of samples,
gigabytes each, which every rank would read and parse at every start (and each evaluation opens
its validation files again), holding the whole file's text while it does. The spans are saved
once in ``<folder>/.casa_index/<file name>.spans``: the magic ``CASASPN1``, a JSON header (format,
the file's size and modification time, the count) padded to 8 bytes, then the starts and the
ends (int64, little endian). A saved index is used only when it matches the file as it is now
(``shard_index``'s rule, same ``StaleIndex``); where the folder cannot be written they are saved
under ``data.index_dir`` if it is set (``shard_index.index_files``), else computed at every start.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from array import array
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from casa_megatron.data.shard_index import StaleIndex, TarStamp, find_current, index_files
from casa_megatron.runtime.atomic import atomic_write

logger = logging.getLogger(__name__)

MAGIC = b"CASASPN1"
FORMAT = 1
_LEN = struct.Struct("<Q")
Spans = Tuple[array, array]


def spans_path(path: Union[str, Path]) -> Path:
    """Where a file's spans live beside it: ``<folder>/.casa_index/<name>.spans``."""
    return index_files(path, None, ".spans")[0]


def _int64(values: array) -> bytes:
    if sys.byteorder != "little":
        values = array("q", values)
        values.byteswap()
    return values.tobytes()


def encode(starts: array, ends: array, stamp: TarStamp) -> bytes:
    header = json.dumps({"format": FORMAT, "file_size": stamp.size, "file_mtime_ns": stamp.mtime_ns,
                         "samples": len(starts)}).encode()
    header += b" " * (-len(header) % 8)
    return MAGIC + _LEN.pack(len(header)) + header + _int64(starts) + _int64(ends)


def load(path: Union[str, Path], where: Optional[Path] = None) -> Spans:
    """The saved spans of ``path`` (read from ``where``, default beside it); ``StaleIndex`` (or
    ``OSError``: none saved) when they do not describe the file as it is now."""
    where = Path(where) if where else spans_path(path)
    data = where.read_bytes()
    if data[:8] != MAGIC or len(data) < 8 + _LEN.size:
        raise StaleIndex(f"{where}: not a span index (no {MAGIC!r} magic)")
    (length,) = _LEN.unpack(data[8:8 + _LEN.size])
    try:
        header = json.loads(data[8 + _LEN.size:8 + _LEN.size + length])
        n, built = int(header["samples"]), TarStamp(int(header["file_size"]), int(header["file_mtime_ns"]))
        version = header["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise StaleIndex(f"{where}: unreadable header ({type(e).__name__}: {e})") from None
    if version != FORMAT:
        raise StaleIndex(f"{where}: index format {version} (this version reads {FORMAT})")
    body = 8 + _LEN.size + length
    if len(data) != body + 16 * n:
        raise StaleIndex(f"{where}: {len(data)} bytes where its header describes {body + 16 * n} (a cut file)")
    now = TarStamp.of(path)
    if built != now:
        raise StaleIndex(f"{where}: built from {path} as it was (size {built.size}); it is now size {now.size}, "
                         f"mtime_ns {now.mtime_ns}")
    starts, ends = array("q"), array("q")
    starts.frombytes(data[body:body + 8 * n])
    ends.frombytes(data[body + 8 * n:])
    if sys.byteorder != "little":
        starts.byteswap()
        ends.byteswap()
    return starts, ends


def spans(path: Union[str, Path], scan: Callable[[Path], Spans], save: bool = True,
          index_dir: Optional[Union[str, Path]] = None) -> Tuple[Spans, bool]:
    """The saved spans when usable (beside the file, then under ``index_dir``), else
    ``scan(path)`` saved for the next start (``save``; under ``index_dir`` when one is given);
    also whether it scanned."""
    path = Path(path)
    places = index_files(path, index_dir, ".spans")
    found = find_current(places, lambda where: load(path, where), "the span index", path)
    if found is not None:
        return found[1], False
    stamp = TarStamp.of(path)
    starts, ends = scan(path)
    if save:
        data = encode(starts, ends, stamp)
        try:
            atomic_write(places[-1], lambda tmp: tmp.write_bytes(data))
        except OSError as e:
            logger.warning("cannot save the span index of %s in %s (%s): computed at every start%s", path,
                           places[-1], e, "" if index_dir else "; data.index_dir names a writable folder for it")
    return (starts, ends), True

"""A dataset that is one annotation file plus a folder of media: LLaVA's ``.json`` (a list of
samples, as LLaVA-OneVision / ShareGPT4V ship them) or a ``.jsonl`` (one sample per line,
LLaVA or Hugging Face chat messages). Media paths in the annotations are relative to
``media_root`` (LLaVA's ``image_folder``; default: the annotation file's directory).

Both are indexed by the byte span of each sample and a sample is parsed when read: a ``.json``
list element by element at start-up (LLaVA's own loader keeps the whole list: 4.4x the file's
bytes as Python objects, measured, and pickled to every process worker), a ``.jsonl`` line by
line. Millions of samples cost 16 bytes each (two int64 arrays), and the spans are saved beside
the file after the first scan (``span_index.py``), so later starts do not parse it. A sample's
key is its ``id`` field, else ``<file name>:<line or index>``.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from pathlib import Path

from casa_megatron.data import span_index
from casa_megatron.data.formats import describe_unknown, detect_format, parse_conversation
from casa_megatron.data.records import RawSample, SampleError, ShardError
from casa_megatron.data.span_index import Spans


class JsonDatasetSource:
    """Random access to the samples of one ``.json`` / ``.jsonl`` annotation file."""

    def __init__(self, path: str | Path, media_root: str | Path = "", index_dir: str | Path = ""):
        self.path = Path(path)
        self.root = Path(media_root) if media_root else self.path.parent
        # byte span [start, end) of each sample in the file, saved beside it after the first scan
        (self._starts, self._ends), _ = span_index.spans(self.path, scan_spans, index_dir=index_dir or None)
        first = self._record(0)
        if detect_format(first) is None:
            raise ShardError(f"{self.path}: unknown annotation format: {describe_unknown(first)}")

    def __len__(self) -> int:
        return len(self._starts)

    def _raw(self, i: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self._starts[i])
            return f.read(self._ends[i] - self._starts[i])

    def _record(self, i: int):
        raw = self._raw(i)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return SampleError("bad_annotation", f"{self.path.name}:{i + 1}: not valid JSON ({e})")

    def key(self, i: int) -> str:
        record = self._record(i)
        rid = record.get("id") if isinstance(record, dict) else None
        return str(rid) if isinstance(rid, (str, int)) else f"{self.path.name}:{i + 1}"

    def location(self, i: int) -> str:
        return str(self.path)

    def read(self, i: int) -> RawSample:
        record = self._record(i)
        if isinstance(record, SampleError):
            raise record
        key = self.key(i)
        conv = parse_conversation(record, key)
        files = {}
        for media in conv.media:
            if not media.source:
                raise SampleError("missing_media", f"{key} in {self.path}: a media part has no path")
            if media.source in files:
                continue
            if "://" in media.source:
                raise SampleError("missing_media", f"{key}: {media.source} is remote; download the media first")
            try:
                files[media.source] = (self.root / media.source).read_bytes()
            except FileNotFoundError as e:
                raise SampleError("missing_media", f"{key} in {self.path}: {e.filename} does not exist") from e
            except OSError as e:
                raise SampleError("unreadable_file", f"{key} in {self.path}: {e}") from e
        return RawSample(key, str(self.path), {"json": json.dumps(record).encode()}, files)


def scan_spans(path: Path) -> Spans:
    """The byte span of each sample of a ``.json`` list or a ``.jsonl`` file (``ShardError`` when
    it has none, or is not JSON)."""
    if path.suffix == ".json":
        return _list_spans(path)
    starts, ends = array("q"), array("q")
    with open(path, "rb") as f:
        offset, last = 0, b""
        for line in f:
            if line.strip():
                starts.append(offset)
                ends.append(offset + len(line))
                last = line
            offset += len(line)
    if starts and _is_seek_index(last):
        starts.pop()  # LiveCC's JSONL ends with the byte offsets of its lines
        ends.pop()
    if not starts:
        raise ShardError(f"{path}: no samples")
    return starts, ends


def _list_spans(path: Path) -> Spans:
    """The byte span of each element of the file's top-level list, parsed one element at a
    time: the samples are not held (LLaVA-OneVision's files hold millions; as Python objects a
    sample took 4.4x its bytes in the file, and the whole list was pickled to every process
    worker)."""
    starts, ends = array("q"), array("q")
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # written by some editors
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not a JSON file ({e})") from e
    del data
    ascii_only = text.isascii()  # then a character offset is a byte offset
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ShardError(f"{path}: a .json dataset must be a non-empty list of samples")
    char, byte = pos, pos if ascii_only else len(text[:pos].encode())  # a known (character, byte) pair
    pos = ws.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: not a JSON file ({e})") from e
        start = pos if ascii_only else byte + len(text[char:pos].encode())
        char, byte = (end, end) if ascii_only else (end, start + len(text[pos:end].encode()))
        starts.append(bom + start)
        ends.append(bom + byte)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise ShardError(f"{path}: not a JSON file (expected ',' or ']' at character {pos})")
    if ws.match(text, pos + 1).end() != len(text):
        raise ShardError(f"{path}: not a JSON file (extra data after the list at character {pos + 1})")
    if not starts:
        raise ShardError(f"{path}: a .json dataset must be a non-empty list of samples")
    return starts, ends


def _is_seek_index(line: bytes) -> bool:
    """A JSON list of integers: the seek index LiveCC appends as a JSONL file's last line."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

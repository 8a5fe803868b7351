"""A dataset that is one annotation file plus a folder of media: LLaVA's ``.json`` (a list of
samples, as LLaVA-OneVision / ShareGPT4V ship them) or a ``.jsonl`` (one sample per line,
LLaVA or Hugging Face chat messages). Media paths in the annotations are relative to
``media_root`` (LLaVA's ``image_folder``; default: the annotation file's directory).

A ``.json`` is loaded whole (as LLaVA's own loader does); a ``.jsonl`` is indexed by line
offsets and each line parsed when read, so millions of lines cost 8 bytes per line (an int64
array: a list of Python ints held 36 and pickled to every process worker as objects). A sample's
key is its ``id`` field, else ``<file name>:<line or index>``.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Optional

from casa_megatron.data.formats import describe_unknown, detect_format, parse_conversation
from casa_megatron.data.records import RawSample, SampleError, ShardError


class JsonDatasetSource:
    """Random access to the samples of one ``.json`` / ``.jsonl`` annotation file."""

    def __init__(self, path: str | Path, media_root: str | Path = ""):
        self.path = Path(path)
        self.root = Path(media_root) if media_root else self.path.parent
        self._records: Optional[list] = None
        self._offsets = array("q")  # byte offset of each non-blank line
        if self.path.suffix == ".json":
            try:
                records = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ShardError(f"{self.path}: not a JSON file ({e})") from e
            if not isinstance(records, list) or not records:
                raise ShardError(f"{self.path}: a .json dataset must be a non-empty list of samples")
            self._records = records
        else:
            with open(self.path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self._offsets.append(offset)
                    offset += len(line)
            if self._offsets and _is_seek_index(self._raw_line(self._offsets[-1])):
                self._offsets.pop()  # LiveCC's JSONL ends with the byte offsets of its lines
            if not self._offsets:
                raise ShardError(f"{self.path}: no samples")
        first = self._record(0)
        if detect_format(first) is None:
            raise ShardError(f"{self.path}: unknown annotation format: {describe_unknown(first)}")

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._offsets)

    def _raw_line(self, offset: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.readline()

    def _record(self, i: int):
        if self._records is not None:
            return self._records[i]
        line = self._raw_line(self._offsets[i])
        try:
            return json.loads(line)
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


def _is_seek_index(line: bytes) -> bool:
    """A JSON list of integers: the seek index LiveCC appends as a JSONL file's last line."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

"""Random access to the samples of a dataset, whatever its storage: shard directory, one tar, a
JSONL manifest, or a JSON dataset (``json_dataset.py``). ``read(i)`` returns raw bytes; decoding
is the processor's job."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from casa_megatron.data.formats import describe_unknown, detect_format
from casa_megatron.data.json_dataset import JsonDatasetSource
from casa_megatron.data.manifest import ManifestEntry, read_entry, read_manifest
from casa_megatron.data.records import RawSample, SampleError, ShardError
from casa_megatron.data.shards import IndexedSample, index_tar, read_sample


class SampleSource:
    """Samples ``0..len-1`` in a fixed, storage-defined order (shards sorted by name)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def location(self, i: int) -> str:
        """The shard or manifest holding sample i (for messages)."""
        raise NotImplementedError

    def read(self, i: int) -> RawSample:
        raise NotImplementedError


class TarSource(SampleSource):
    def __init__(self, shards: List[Path], index_threads: int = 8):
        if not shards:
            raise ShardError("no .tar shards given")
        self.shards = [str(p) for p in shards]
        with ThreadPoolExecutor(max_workers=max(1, min(index_threads, len(shards)))) as pool:
            indexes = list(pool.map(index_tar, self.shards))  # ShardError propagates, naming the shard
        self.samples: List[Tuple[int, IndexedSample]] = [
            (s, entry) for s, index in enumerate(indexes) for entry in index]
        self.shard_sizes = [len(index) for index in indexes]

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        return self.samples[i][1].key

    def location(self, i: int) -> str:
        return self.shards[self.samples[i][0]]

    def read(self, i: int) -> RawSample:
        shard, entry = self.samples[i]
        return read_sample(self.shards[shard], entry)


class ManifestSource(SampleSource):
    def __init__(self, path: Path):
        self.path = str(path)
        self.entries: List[ManifestEntry] = read_manifest(path)

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i].key

    def location(self, i: int) -> str:
        return self.path

    def read(self, i: int) -> RawSample:
        return read_entry(self.entries[i], self.path)


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.sources`` / ``data.valid``: ``{path, weight, media_root}``."""

    path: str
    weight: float = 1.0
    media_root: str = ""  # JSON datasets: where relative media paths point (default: the file's dir)

    @classmethod
    def parse(cls, entry, where: str) -> "SourceSpec":
        if isinstance(entry, str):
            return cls(entry)
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where}: each source is {{path, weight?, media_root?}}, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "weight", "media_root"})
        if unknown:
            raise ValueError(f"{where}: unknown source keys {unknown} (known: path, weight, media_root)")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ValueError(f"{where}: weight of {entry['path']!r} must be a number > 0, got {weight!r}")
        return cls(str(entry["path"]), float(weight), str(entry.get("media_root") or ""))


def open_source(spec: SourceSpec | str | Path) -> SampleSource:
    """A directory of ``*.tar`` shards (sorted by name), one ``.tar``, a ``.jsonl`` manifest,
    or a JSON dataset (LLaVA ``.json`` list, LLaVA / chat-messages ``.jsonl``).

    The first sample's annotation format is checked here, so an unknown format stops start-up
    with an error naming the file rather than skipping every sample."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec(str(spec))
    path = Path(spec.path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ShardError(f"{path}: directory has no *.tar shards")
        source: SampleSource = TarSource(shards)
    elif path.suffix == ".tar":
        source = TarSource([path])
    elif not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    elif path.suffix == ".jsonl" and _is_manifest(path):
        source = ManifestSource(path)
    elif path.suffix in (".json", ".jsonl"):
        return JsonDatasetSource(path, spec.media_root)
    else:
        raise ShardError(f"{path}: expected a shard directory, a .tar, a .jsonl manifest or a .json / .jsonl "
                         "dataset")
    _check_first_format(source)
    return source


def _is_manifest(path: Path) -> bool:
    """Our manifest lines have ``media`` and ``annotation``; a JSONL dataset's lines do not."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return True  # the manifest reader reports bad lines per sample
                return isinstance(first, dict) and "annotation" in first and "media" in first
    return True


def _check_first_format(source: SampleSource) -> None:
    try:
        raw = source.read(0)
        obj = json.loads(raw.parts["json"])
    except (SampleError, KeyError, ValueError):
        return  # a broken first sample is skipped and counted like any other
    if detect_format(obj) is None:
        raise ShardError(f"{source.location(0)} (sample {source.key(0)!r}): unknown annotation format: "
                         f"{describe_unknown(obj)}")

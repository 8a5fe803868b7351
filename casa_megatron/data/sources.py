"""Random access to the samples of a dataset, whatever its storage: shard directory, one tar, or
a JSONL manifest. ``read(i)`` returns raw bytes; decoding is the processor's job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

from casa_megatron.data.manifest import ManifestEntry, read_entry, read_manifest
from casa_megatron.data.records import RawSample, ShardError
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


def open_source(path: str | Path) -> SampleSource:
    """A directory of ``*.tar`` shards (sorted by name), one ``.tar``, or a ``.jsonl`` manifest."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ShardError(f"{path}: directory has no *.tar shards")
        return TarSource(shards)
    if path.suffix == ".tar":
        return TarSource([path])
    if path.suffix == ".jsonl":
        return ManifestSource(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    raise ShardError(f"{path}: expected a shard directory, a .tar or a .jsonl manifest")

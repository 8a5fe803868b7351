"""Random access to the samples of a dataset, whatever its storage: shard directory, one tar, a
JSONL manifest, or a JSON dataset (``json_dataset.py``); a subset of one (``SubsetSource``), and
the datasets of a data recipe (``open_sources``, ``recipe.py``). ``read(i)`` returns raw bytes;
decoding is the processor's job."""

from __future__ import annotations

import json
import logging
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from casa_megatron.data import shard_index
from casa_megatron.data.formats import describe_unknown, detect_format, sample_annotation
from casa_megatron.data.json_dataset import JsonDatasetSource
from casa_megatron.data.manifest import ManifestEntry, read_entry, read_manifest
from casa_megatron.data.recipe import check_strategy, expand, is_recipe, subset_indices, weigh
from casa_megatron.data.records import RawSample, SampleError, ShardError
from casa_megatron.data.shards import IndexedSample, read_sample, warn_damaged

logger = logging.getLogger(__name__)
OPEN_INDEXES = 256  # shard indexes memory-mapped at once per process (least recently used closed first)


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
    """Tar shards, each indexed once into a compact file beside it (``shard_index.py``): start-up
    reads one header per shard, an entry is looked up in its shard's memory-mapped index when a
    sample is read, and the source holds (and pickles to process workers) O(shards) memory."""

    def __init__(self, shards: List[Path], index_threads: int = 8, open_indexes: int = OPEN_INDEXES,
                 index_dir: str = ""):
        if not shards:
            raise ShardError("no .tar shards given")
        self.shards = [str(p) for p in shards]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(index_threads, len(shards)))) as pool:
            # ShardError propagates, naming the shard
            found = list(pool.map(lambda shard: shard_index.ensure(shard, index_dir=index_dir or None), self.shards))
        for shard, now in zip(self.shards, found):
            if now.problem:  # damage the index records is named at every start
                warn_damaged(shard, now.problem, now.samples)
        self.shard_sizes = [now.samples for now in found]
        self._starts = [0, *accumulate(self.shard_sizes)]  # [shards + 1] first sample of each shard
        # where an index lives when not beside its shard (under data.index_dir); None: beside it (or
        # in memory), so the pickle sent to process workers stays O(shards) small
        self._index_files = [None if now.path is None or now.path == shard_index.index_path(shard) else str(now.path)
                             for shard, now in zip(self.shards, found)]
        # indexes that could not be saved (a read-only folder, no data.index_dir) stay in memory
        self._in_memory: Dict[int, shard_index.ShardIndex] = {s: now.in_memory for s, now in enumerate(found)
                                                              if now.in_memory is not None}
        built = sum(now.built for now in found)
        if built:
            logger.info("indexed %d of %d shard(s) (%d samples) in %.1f s%s", built, len(shards),
                        sum(self.shard_sizes), time.perf_counter() - start,
                        "" if len(self._in_memory) == built else "; saved for the next start in "
                        + (index_dir or f"{shard_index.INDEX_DIR}/ beside them"))
        if self._in_memory:
            logger.warning("%d shard index(es) could not be saved (first: %s, in %s) and are kept in memory, "
                           "rebuilt at every start; %s", len(self._in_memory), self.shards[min(self._in_memory)],
                           shard_index.index_files(self.shards[min(self._in_memory)], index_dir or None)[-1],
                           "data.index_dir names a writable folder for them (Megatron-LM's --data-cache-path), "
                           "or where the data folder is writable `python tools/index_shards.py` saves them once"
                           if not index_dir else "is data.index_dir writable?")
        self.open_indexes = open_indexes
        self._open: "OrderedDict[int, shard_index.ShardIndex]" = OrderedDict()  # memory-mapped, most recent last
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> Tuple[int, int]:
        """(shard, sample within it) of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a source with {len(self)} samples")
        shard = bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _index(self, shard: int) -> shard_index.ShardIndex:
        if shard in self._in_memory:
            return self._in_memory[shard]
        with self._lock:
            index = self._open.get(shard)
            if index is None:
                index = shard_index.open_saved(self.shards[shard], self._index_files[shard])
                if len(index) != self.shard_sizes[shard]:
                    raise shard_index.StaleIndex(f"the index of {self.shards[shard]} now has {len(index)} samples, "
                                                 f"{self.shard_sizes[shard]} at start-up")
                self._open[shard] = index
                if len(self._open) > self.open_indexes:
                    self._open.popitem(last=False)  # its mapping closes once no reader holds it
            else:
                self._open.move_to_end(shard)
            return index

    def _entry(self, i: int) -> Tuple[int, IndexedSample]:
        shard, local = self._locate(i)
        try:
            return shard, self._index(shard).entry(local)
        except (shard_index.StaleIndex, OSError) as e:  # the shard changed or vanished mid-run
            raise SampleError("unreadable_shard", f"sample {local} of {self.shards[shard]}: {e}") from e

    def key(self, i: int) -> str:
        try:
            return self._entry(i)[1].key
        except SampleError:
            shard, local = self._locate(i)
            return f"<sample {local} of {Path(self.shards[shard]).name}>"

    def location(self, i: int) -> str:
        return self.shards[self._locate(i)[0]]

    def read(self, i: int) -> RawSample:
        shard, entry = self._entry(i)
        return read_sample(self.shards[shard], entry)

    def __getstate__(self) -> dict:  # to process workers: no mappings, no lock
        state = dict(self.__dict__)
        state["_open"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SubsetSource(SampleSource):
    """The samples of ``base`` at ``indices`` (a subset strategy's selection, ``recipe.py``)."""

    def __init__(self, base: SampleSource, indices: Sequence[int], strategy: str):
        self.base, self.indices, self.strategy = base, indices, strategy

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        return self.base.key(int(self.indices[i]))

    def location(self, i: int) -> str:
        return self.base.location(int(self.indices[i]))

    def read(self, i: int) -> RawSample:
        return self.base.read(int(self.indices[i]))


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
    subset: str = "all"  # which samples: all, first:N, end:N, random:N (N a count or P%; recipe.py)
    recipe: str = ""  # the data recipe this dataset came from (recipe.py), if any

    @classmethod
    def parse(cls, entry, where: str) -> "SourceSpec":
        if isinstance(entry, str):
            return cls(entry)
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where}: each source is {{path, weight?, media_root?}}, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "weight", "media_root", "subset"})
        if unknown:
            raise ValueError(f"{where}: unknown source keys {unknown} (known: path, weight, media_root, subset)")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ValueError(f"{where}: weight of {entry['path']!r} must be a number > 0, got {weight!r}")
        subset = check_strategy(entry.get("subset", "all"), f"{where} ({entry['path']})")
        if subset != "all" and is_recipe(entry["path"]):
            raise ValueError(f"{where}: subset {subset!r} of a recipe ({entry['path']}): give each dataset's "
                             "sampling_strategy in the recipe")
        return cls(str(entry["path"]), float(weight), str(entry.get("media_root") or ""), subset)


def open_source(spec: SourceSpec | str | Path, index_dir: str = "") -> SampleSource:
    """A directory of ``*.tar`` shards (sorted by name), one ``.tar``, a ``.jsonl`` manifest,
    or a JSON dataset (LLaVA ``.json`` list, LLaVA / chat-messages ``.jsonl``).

    The first sample's annotation format is checked here, so an unknown format stops start-up
    with an error naming the file rather than skipping every sample. ``spec.subset`` other than
    ``all`` gives the samples it selects (``recipe.py``). ``index_dir``: where indexes are saved
    when not beside the data (``data.index_dir``, ``shard_index.index_files``)."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec(str(spec))
    path = Path(spec.path)
    if is_recipe(path):
        raise ShardError(f"{path} is a data recipe: its datasets are opened by open_sources")
    source = _open_one(spec, path, index_dir)
    if spec.subset != "all":
        source = SubsetSource(source, subset_indices(spec.subset, len(source), path.name), spec.subset)
    return source


def open_sources(specs: Sequence[SourceSpec], index_dir: str = "") -> Tuple[List[SourceSpec], List[SampleSource]]:
    """Every source of ``specs``, data recipes replaced by their datasets (``recipe.py``), each
    recipe's datasets weighted by the samples they select; the specs as opened and the sources."""
    specs = expand(specs)
    sources = [open_source(spec, index_dir) for spec in specs]
    return weigh(specs, [len(s) for s in sources]), sources


def _open_one(spec: SourceSpec, path: Path, index_dir: str) -> SampleSource:
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ShardError(f"{path}: directory has no *.tar shards")
        source: SampleSource = TarSource(shards, index_dir=index_dir)
    elif path.suffix == ".tar":
        source = TarSource([path], index_dir=index_dir)
    elif not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    elif path.suffix == ".jsonl" and is_manifest(path):
        source = ManifestSource(path)
    elif path.suffix in (".json", ".jsonl"):
        return JsonDatasetSource(path, spec.media_root, index_dir)  # checks its first sample's format itself
    else:
        raise ShardError(f"{path}: expected a shard directory, a .tar, a .jsonl manifest or a .json / .jsonl "
                         "dataset")
    _check_first_format(source)
    return source


def is_manifest(path: Path) -> bool:
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
        obj = sample_annotation(source.read(0))
    except SampleError:
        return  # a broken first sample is skipped and counted like any other
    if detect_format(obj) is None:
        raise ShardError(f"{source.location(0)} (sample {source.key(0)!r}): unknown annotation format: "
                         f"{describe_unknown(obj)}")

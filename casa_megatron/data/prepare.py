"""A run's data indexes, built once before training and shared among the ranks.

Tar shards get their saved index (``shard_index.py``), JSON datasets their saved byte spans
(``span_index.py``). A loader builds whatever is missing itself, but on a run's first start every
rank would then scan every file; here rank ``r`` of ``W`` indexes files ``r, r + W, ...`` (what
lacks a current index), and the caller waits for all (a barrier) before any rank opens its
sources, which then find everything saved. Where a folder cannot be written the ranks still
build their own, in memory (nothing is lost but the sharing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence, Union

from casa_megatron.data.shard_index import index_shards, shards_of

logger = logging.getLogger(__name__)


def data_files(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """The files behind data sources that have an index: tar shards (of folders, or single
    tars) and JSON datasets (``.json`` / ``.jsonl`` files that are not our manifests)."""
    from casa_megatron.data.sources import is_manifest

    out = shards_of(paths)
    for path in map(Path, paths):
        if path.suffix in (".json", ".jsonl") and path.is_file() and not (
                path.suffix == ".jsonl" and is_manifest(path)):
            out.append(path)
    return list(dict.fromkeys(out))


def index_my_share(files: Sequence[Path], rank: int, world: int, index_dir: str = "") -> int:
    """Index this rank's share of ``files`` where no current index is saved; how many it built.
    A file that cannot be indexed is left for its loader to name. ``index_dir``: where indexes
    are saved when not beside the data (``data.index_dir``; it must be one folder that every rank
    sees for the work to be shared among nodes)."""
    from casa_megatron.data import span_index
    from casa_megatron.data.json_dataset import scan_spans
    from casa_megatron.data.records import ShardError

    mine = list(files)[rank::world]
    built = index_shards([f for f in mine if f.suffix == ".tar"], threads=2, progress=False,
                         index_dir=index_dir or None).built
    for path in (f for f in mine if f.suffix != ".tar"):
        try:
            built += span_index.spans(path, scan_spans, index_dir=index_dir or None)[1]
        except (ShardError, OSError):
            pass  # the loader refuses it, naming it
    if built:
        logger.info("rank %d indexed %d of the data's %d file(s)", rank, built, len(files))
    return built

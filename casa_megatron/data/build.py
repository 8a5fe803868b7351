"""Loose ``<key>.<ext>`` files -> tar shards (and a JSONL manifest of the same files).

Files are grouped by key (relative path up to the basename's first dot, as webdataset does:
``a.0.jpg`` and ``a.1.jpg`` are the media parts of sample ``a``) and
written in sorted key order, so the shards are reproducible. A key without a ``.json`` part or
without a media part is reported and left out rather than written as a broken sample.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from casa_megatron.data.manifest import write_manifest
from casa_megatron.data.processor import IMAGE_EXTS, VIDEO_EXTS, part_order
from casa_megatron.data.shard_index import index_shards
from casa_megatron.data.shards import ShardWriter, split_key
from casa_megatron.runtime.atomic import staged_folder

logger = logging.getLogger(__name__)


def collect_samples(src_dir: str | Path) -> Tuple[Dict[str, Dict[str, Path]], List[str]]:
    """key -> {ext: path} for complete samples, and the keys left out (with why)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    groups: Dict[str, Dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key, ext = split_key(path.relative_to(src).as_posix())
        if key:
            groups[key][ext] = path
    complete, rejected = {}, []
    for key in sorted(groups):
        exts = {e.rsplit(".", 1)[-1].lower() for e in groups[key]}
        if "json" not in exts:
            rejected.append(f"{key}: no .json")
        elif not exts & set(IMAGE_EXTS + VIDEO_EXTS):
            rejected.append(f"{key}: no image/video file")
        else:
            complete[key] = groups[key]
    return complete, rejected


def build_shards(src_dir: str | Path, out_dir: str | Path, samples_per_shard: int = 1000,
                 manifest: Optional[str | Path] = None, progress: bool = True, force: bool = False) -> List[Path]:
    """Write ``out_dir/shard-NNNNNN.tar``; optionally a manifest (paths relative to it).

    The shards are written into a hidden sibling folder that replaces ``out_dir`` only once every
    shard is complete: an interrupted build leaves no cut-short ``.tar`` that a loader would read,
    and a rebuild never leaves stale shards of an earlier, larger build mixed in with the new ones
    (a loader reads every ``*.tar`` of the folder). An existing, non-empty ``out_dir`` is refused
    unless ``force``. Each shard's index is saved with it (``shard_index.py``)."""
    from tqdm import tqdm

    samples, rejected = collect_samples(src_dir)
    for why in rejected:
        logger.warning("build_shards: leaving out %s", why)
    if not samples:
        raise ValueError(f"{src_dir}: no complete sample (<key>.json + an image or video file)")
    out_dir = Path(out_dir)
    with staged_folder(out_dir, force, "it may hold data shards") as tmp:
        with ShardWriter(tmp, samples_per_shard) as writer:
            for key, parts in tqdm(samples.items(), desc="shards", unit="sample", disable=not progress):
                writer.write(key, {ext: path.read_bytes() for ext, path in parts.items()})
        # each shard's index, saved beside it (shard_index.py): no loader start has to scan them
        report = index_shards(writer.paths, progress=progress)
        if report.failed:
            raise ValueError(f"indexing the new shards failed: {report.failed}")
    if manifest is not None:
        root = Path(manifest).resolve().parent
        rows = []
        for key, parts in samples.items():
            media = [_relative(p, root) for e, p in sorted(parts.items(), key=lambda kv: part_order(kv[0]))
                     if e.rsplit(".", 1)[-1].lower() != "json"]
            rows.append({"key": key, "media": media[0] if len(media) == 1 else media,
                         "annotation": _relative(parts["json"], root)})
        write_manifest(manifest, rows)
    return [out_dir / path.name for path in writer.paths]


def _relative(path: Path, root: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), root)

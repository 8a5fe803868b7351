"""A JSONL manifest of local files: one sample per line, paths relative to the manifest.

    {"key": "img_000001", "media": "raw/img_000001.png", "annotation": "raw/img_000001.json"}
    {"key": "vid_000003", "media": "raw/vid_000003.mp4", "annotation": {"captions": [...]}}
    {"key": "multi_000000", "media": ["raw/multi_000000.0.png", "raw/multi_000000.1.png"], ...}

``media`` is one path or a list (the sample's media parts in order). ``annotation`` is a path to the sample's JSON or the JSON object itself. Useful while a dataset
is still being assembled (no shard building step); shards are faster to read at scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Union

from casa_megatron.data.records import RawSample, SampleError, ShardError
from casa_megatron.runtime.atomic import atomic_write_text


@dataclass
class ManifestEntry:
    key: str
    media: Optional[List[Path]]
    annotation: Union[Path, dict, None]
    error: Optional[str] = None  # a line that could not be parsed: reading it raises SampleError


def read_manifest(path: str | Path) -> List[ManifestEntry]:
    path = Path(path)
    root = path.parent
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key, media, ann = obj["key"], obj["media"], obj["annotation"]
            media = [media] if isinstance(media, str) else media
            if not isinstance(key, str) or not isinstance(media, list) or not media \
                    or not all(isinstance(m, str) for m in media) or not isinstance(ann, (str, dict)):
                raise TypeError("key must be a string, media a path or a list of paths, annotation a path or "
                                "an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            entries.append(ManifestEntry(f"{path.name}:{lineno}", None, None, f"bad manifest line ({e})"))
            continue
        entries.append(ManifestEntry(key, [root / m for m in media], root / ann if isinstance(ann, str) else ann))
    if not entries:
        raise ShardError(f"manifest {path}: no samples")
    return entries


def read_entry(entry: ManifestEntry, manifest: str) -> RawSample:
    if entry.error:
        raise SampleError("bad_manifest_line", f"{entry.key}: {entry.error}")
    parts = {}
    try:
        for i, media in enumerate(entry.media):
            ext = media.suffix.lstrip(".").lower()
            parts[ext if len(entry.media) == 1 else f"{i}.{ext}"] = media.read_bytes()
        if isinstance(entry.annotation, dict):
            parts["json"] = json.dumps(entry.annotation).encode()
        else:
            parts["json"] = entry.annotation.read_bytes()
    except FileNotFoundError as e:
        raise SampleError("missing_file", f"{entry.key} in {manifest}: {e.filename} does not exist") from e
    except OSError as e:
        raise SampleError("unreadable_file", f"{entry.key} in {manifest}: {e}") from e
    return RawSample(entry.key, manifest, parts)


def write_manifest(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

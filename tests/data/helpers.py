"""Media and shard builders for the data tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(height: int = 60, width: int = 90, colour=(200, 40, 40)) -> bytes:
    return png_bytes(np.full((height, width, 3), colour, dtype=np.uint8))


def colour_clip(num_frames: int = 30, height: int = 64, width: int = 96) -> list:
    """Frame i is one solid colour, far (>= 40 levels) from its neighbours in some channel."""
    return [np.full((height, width, 3), frame_colour(i), dtype=np.uint8) for i in range(num_frames)]


def frame_colour(i: int) -> tuple:
    return ((i * 37) % 256, (i * 91 + 40) % 256, (255 - i * 53) % 256)


def qa_json(question: str = "what colour is the shape ?", answer: str = "red", qtype: str = "coarse") -> bytes:
    return json.dumps({"conversation": [{"question": question, "answer": answer}], "type": qtype}).encode()


def captions_json(times: Sequence[float] = (0.0, 1.0, 2.0), text: str = "the red circle moves right") -> bytes:
    return json.dumps({"captions": [{"t": t, "text": text} for t in times], "type": "coarse"}).encode()


def write_shard_dir(out: Path, samples: Dict[str, Dict[str, bytes]], per_shard: int = 4) -> Path:
    """Samples (key -> {ext: bytes}) into tar shards under ``out``, in the given key order."""
    from casa_megatron.data.shards import ShardWriter

    with ShardWriter(out, per_shard) as writer:
        for key, parts in samples.items():
            writer.write(key, parts)
    return out


def batch_keys(iterator, batches: int) -> list:
    """The sample keys of each of the iterator's next ``batches`` batches."""
    out = []
    for _ in range(batches):
        next(iterator)
        out.append([s.key for s in iterator.last_batch_samples])
    return out

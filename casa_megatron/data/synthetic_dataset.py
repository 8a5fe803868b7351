"""A small real dataset on disk: PNG images, H.264 (or VP9) clips, a tokenizer, shards, manifest.

Layout written under ``out``::

    raw/img_000000.png + raw/img_000000.json   {"conversation": [...], "type": "coarse"|"fine", "task"}
    raw/vid_000000.mp4 + raw/vid_000000.json   {"captions": [{"t", "text"}...], "type": "coarse"}
    tokenizer/                                 word-level HF tokenizer over the generator's vocabulary
    shards/shard-000000.tar ...                webdataset-convention shards of raw/
    manifest.jsonl                             the same samples as local files

Image tasks cycle through shape, colour, count (coarse) and number, word, chart (fine), so
every type is represented; a quality benchmark reads ``type`` / ``task`` to report per-type
accuracy. The tokenizer covers every word the generator can emit, so datasets generated with
other seeds share it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict

import numpy as np

from casa_megatron.data.build import build_shards
from casa_megatron.data.synthetic_media import QUESTIONS, TASK_TYPE, render_clip, render_image_task, vocabulary
from casa_megatron.data.tokenization import build_word_tokenizer
from casa_megatron.data.video.encode import encode_video, extension

IMAGE_TASKS = tuple(QUESTIONS)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(out: str | Path, num_images: int = 192, num_videos: int = 24, seed: int = 0,
                 samples_per_shard: int = 32, video_codec: str = "h264", video_fps: int = 10,
                 video_seconds: float = 3.0, progress: bool = True) -> Dict[str, Path]:
    """Generate everything under ``out``; returns the paths of raw/, tokenizer/, shards/, manifest."""
    from tqdm import tqdm

    out = Path(out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in tqdm(range(num_images), desc="images", unit="img", disable=not progress):
        task = IMAGE_TASKS[i % len(IMAGE_TASKS)]
        pixels, turns = render_image_task(rng, task)
        meta = {"conversation": turns, "type": TASK_TYPE[task], "task": task}
        (raw / f"img_{i:06d}.png").write_bytes(_png(pixels))
        (raw / f"img_{i:06d}.json").write_text(json.dumps(meta))
    for i in tqdm(range(num_videos), desc="videos", unit="clip", disable=not progress):
        frames, captions = render_clip(rng, fps=video_fps, seconds=video_seconds)
        meta = {"captions": captions, "type": "coarse", "task": "caption", "fps": video_fps}
        (raw / f"vid_{i:06d}{extension(video_codec)}").write_bytes(encode_video(frames, video_fps, video_codec))
        (raw / f"vid_{i:06d}.json").write_text(json.dumps(meta))
    tokenizer = build_word_tokenizer([" ".join(vocabulary())], out / "tokenizer")
    shards = out / "shards"
    build_shards(raw, shards, samples_per_shard, manifest=out / "manifest.jsonl", progress=progress)
    return {"raw": raw, "tokenizer": tokenizer, "shards": shards, "manifest": out / "manifest.jsonl"}

"""A small real dataset on disk: PNG images, H.264 (or VP9) clips, a tokenizer, shards, manifest.

Layout written under ``out``::

    raw/img_000000.png + raw/img_000000.json   {"conversation": [...], "type": "coarse"|"fine", "task"}
    raw/vid_000000.mp4 + raw/vid_000000.json   {"captions": [{"t", "text"}...], "type": "coarse"}
    tokenizer/                                 word-level HF tokenizer over the generator's vocabulary,
                                               with a Qwen2.5-like chat template
    shards/shard-000000.tar ...                webdataset-convention shards of raw/ (our format)
    manifest.jsonl                             the same samples as local files
    raw_multi/multi_000000.{0,1}.png + .json   two-image LLaVA samples ({"image": [...], "conversations"})
    multi/shard-000000.tar ...                 their shards (key.0.png, key.1.png, key.json)
    llava_multi.jsonl                          the same as a LLaVA JSONL (media_root: raw_multi)
    valid/shard-000000.tar ...                 held-out split (another seed): images, clips, two-image samples

Image tasks cycle through shape, colour, count (coarse) and number, word, chart (fine), so
every type is represented; a quality benchmark reads ``type`` / ``task`` to report per-type
accuracy. Two-image tasks ask which picture has more shapes or whether both shapes share a
colour. The tokenizer covers every word the generator can emit, so datasets generated with
other seeds share it. Images and clips come first from the seed's generator, so adding
two-image samples or a validation split leaves them unchanged.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict

import numpy as np

from casa_megatron.data.build import build_shards
from casa_megatron.data.synthetic_media import (MULTI_QUESTIONS, QUESTIONS, TASK_TYPE, render_clip,
                                                render_image_task, render_multi_task, vocabulary)
from casa_megatron.data.tokenization import build_word_tokenizer
from casa_megatron.data.video.encode import encode_video, extension

IMAGE_TASKS = tuple(QUESTIONS)
MULTI_TASKS = tuple(MULTI_QUESTIONS)
VALID_SEED_OFFSET = 1000
# Qwen2.5-VL's turn structure and vision placeholders, without the default system prompt (short
# samples for the CPU job). Newlines vanish in the word-level tokenizer; the special tokens stay.
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(raw: Path, rng: np.random.Generator, num_images: int, num_videos: int, num_multi: int,
                 video_codec: str, video_fps: int, video_seconds: float, progress: bool) -> None:
    """Images, then clips, then two-image samples, all drawn from ``rng`` in that order."""
    from tqdm import tqdm

    raw.mkdir(parents=True, exist_ok=True)
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
    for i in tqdm(range(num_multi), desc="two-image", unit="sample", disable=not progress):
        task = MULTI_TASKS[i % len(MULTI_TASKS)]
        images, question, answer = render_multi_task(rng, task)
        key = f"multi_{i:06d}"
        names = [f"{key}.{j}.png" for j in range(len(images))]
        for name, pixels in zip(names, images):
            (raw / name).write_bytes(_png(pixels))
        meta = {"id": key, "image": names, "type": "coarse", "task": task,
                "conversations": [{"from": "human", "value": "<image>\n" * len(images) + question},
                                  {"from": "gpt", "value": answer}]}
        (raw / f"{key}.json").write_text(json.dumps(meta))


def make_dataset(out: str | Path, num_images: int = 192, num_videos: int = 24, seed: int = 0,
                 samples_per_shard: int = 32, video_codec: str = "h264", video_fps: int = 10,
                 video_seconds: float = 3.0, progress: bool = True, num_multi: int = 0,
                 valid_fraction: float = 0.0) -> Dict[str, Path]:
    """Generate everything under ``out``; returns the paths of raw/, tokenizer/, shards/, manifest
    (and multi/, llava_multi.jsonl, valid/ when ``num_multi`` / ``valid_fraction`` ask for them)."""
    out = Path(out)
    video = (video_codec, video_fps, video_seconds, progress)
    raw = out / "raw"
    _write_split(raw, np.random.default_rng(seed), num_images, num_videos, 0, *video)
    tokenizer = build_word_tokenizer([" ".join(vocabulary())], out / "tokenizer", extra_tokens=CHAT_SPECIALS,
                                     chat_template=CHAT_TEMPLATE)
    shards = out / "shards"
    build_shards(raw, shards, samples_per_shard, manifest=out / "manifest.jsonl", progress=progress)
    paths = {"raw": raw, "tokenizer": tokenizer, "shards": shards, "manifest": out / "manifest.jsonl"}
    if num_multi:
        raw_multi = out / "raw_multi"
        _write_split(raw_multi, np.random.default_rng([seed, 1]), 0, 0, num_multi, *video)
        build_shards(raw_multi, out / "multi", samples_per_shard, progress=progress)
        records = [json.loads(p.read_text()) for p in sorted(raw_multi.glob("*.json"))]
        (out / "llava_multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.update(raw_multi=raw_multi, multi=out / "multi", llava_multi=out / "llava_multi.jsonl")
    if valid_fraction > 0:
        n = [max(1, round(valid_fraction * k)) if k else 0 for k in (num_images, num_videos, num_multi)]
        _write_split(out / "valid_raw", np.random.default_rng(seed + VALID_SEED_OFFSET), *n, *video)
        build_shards(out / "valid_raw", out / "valid", samples_per_shard, progress=progress)
        paths["valid"] = out / "valid"
    return paths

"""One raw sample (bytes) -> one ``TokenizedSample``: decode, resize, tokenize, lay out, fit.

This is the expensive per-sample work, run by the loader's background workers. It is a pure
function of the sample's bytes and the settings (no randomness), so a resumed run that
re-processes a sample gets exactly the same result. Every data problem surfaces as a
``SampleError`` with a reason tag; the loader skips and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from casa_megatron.data.annotations import parse_annotation
from casa_megatron.data.image_processing import process_image
from casa_megatron.data.interleave import fit_to_budget, image_sample, video_sample
from casa_megatron.data.records import RawSample, SampleError, TokenizedSample
from casa_megatron.data.tokenization import TextTokenizer

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass(frozen=True)
class ProcessorSettings:
    """The subset of ``DataConfig`` a worker needs (plain values: cheap to send to processes)."""

    tokenizer_path: str
    seq_length: int
    image_seq_length: int
    max_pixels: int = 448 * 448
    min_pixels: int = 56 * 56
    video_max_pixels: int = 224 * 224
    fps: float = 2.0
    max_frames: int = 32
    window_per_frame: bool = True
    qa_windows: str = "per_turn"
    decoder: str = "cpu"
    truncate: bool = True
    image_token: str = "<image>"
    answer_token: str = "<answer>"
    end_of_turn_token: str = "<eot>"

    @classmethod
    def from_config(cls, cfg, decoder: str) -> "ProcessorSettings":
        tok = cfg.resolved_tokenizer_path()
        if tok is None:
            raise FileNotFoundError(f"data.tokenizer_path is empty and no 'tokenizer' directory lies next to "
                                    f"{cfg.source!r}")
        return cls(str(tok), cfg.seq_length, cfg.image_seq_length, cfg.pixel_budget, cfg.min_pixels,
                   cfg.video_pixel_budget, cfg.fps, cfg.max_frames, cfg.window_per_frame, cfg.qa_windows,
                   decoder, cfg.truncate, cfg.image_token, cfg.answer_token, cfg.end_of_turn_token)


def split_parts(raw: RawSample) -> Tuple[str, bytes, bytes]:
    """(media extension, media bytes, annotation bytes) or SampleError naming what is missing."""
    exts = {ext.lower().rsplit(".", 1)[-1]: ext for ext in raw.parts}
    media = [e for e in exts if e in IMAGE_EXTS + VIDEO_EXTS]
    if "json" not in exts:
        raise SampleError("missing_annotation", f"{raw.key} in {raw.source}: no .json part "
                          f"(found {sorted(raw.parts)})")
    if not media:
        raise SampleError("missing_media", f"{raw.key} in {raw.source}: no image or video part "
                          f"(found {sorted(raw.parts)})")
    if len(media) > 1:
        raise SampleError("ambiguous_media", f"{raw.key} in {raw.source}: several media parts {media}")
    return media[0], raw.parts[exts[media[0]]], raw.parts[exts["json"]]


class SampleProcessor:
    def __init__(self, settings: ProcessorSettings):
        self.settings = settings
        self.tokenizer = TextTokenizer(settings.tokenizer_path, settings.image_token,
                                       settings.answer_token, settings.end_of_turn_token)
        self._decoder = None

    def __getstate__(self) -> Dict:
        return {"settings": self.settings, "tokenizer": self.tokenizer, "_decoder": None}

    @property
    def decoder(self):
        if self._decoder is None:
            from casa_megatron.data.video import make_video_decoder

            self._decoder = make_video_decoder(self.settings.decoder)
        return self._decoder

    def __call__(self, raw: RawSample) -> TokenizedSample:
        s = self.settings
        ext, media, meta = split_parts(raw)
        ann = parse_annotation(meta, raw.key)
        if ext in IMAGE_EXTS:
            pixels = process_image(media, s.max_pixels, s.min_pixels, raw.key)
            sample = image_sample(raw.key, ann, pixels, self.tokenizer, s.qa_windows)
        else:
            clip = self.decoder.decode(media, s.fps, s.max_frames, s.video_max_pixels, s.min_pixels, raw.key)
            sample = video_sample(raw.key, ann, clip.frames, clip.times, s.fps, self.tokenizer,
                                  s.window_per_frame)
        sample = fit_to_budget(sample, s.seq_length, s.image_seq_length, s.truncate)
        sample.check()
        return sample


def process_or_error(processor: SampleProcessor, raw: RawSample) -> TokenizedSample | SampleError:
    """Worker entry point: data errors come back as values so one bad sample never raises."""
    try:
        return processor(raw)
    except SampleError as e:
        return e

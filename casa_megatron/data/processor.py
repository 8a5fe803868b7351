"""One raw sample (bytes) -> one ``TokenizedSample``: parse, resolve media, decode, lay out, fit.

This is the expensive per-sample work, run by the loader's background workers. It is a pure
function of the sample's bytes and the settings (no randomness), so a resumed run that
re-processes a sample gets exactly the same result. Every data problem surfaces as a
``SampleError`` with a reason tag; the loader skips and counts it.

Media resolution: a JSON dataset's sample carries its files by path (``RawSample.files``);
a tar shard's sample has media parts ``<key>.<ext>`` or ``<key>.<i>.<ext>``, assigned in index
order to the annotation's distinct media references (our format's one image, shown again in
every turn, is one reference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

from casa_megatron.data.chat_template import ChatTemplateLayout, DecodedMedia
from casa_megatron.data.config import TEXT_LAYOUTS
from casa_megatron.data.conversation import Conversation, Media
from casa_megatron.data.formats import parse_conversation, sample_annotation
from casa_megatron.data.image_processing import process_image
from casa_megatron.data.interleave import LayoutTokens, fit_to_budget
from casa_megatron.data.records import RawSample, SampleError, TokenizedSample

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
_INDEXED = re.compile(r"^(\d+)\.")


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
    text_layout: str = "auto"
    image_placeholder: str = ""
    video_placeholder: str = ""
    merge_consecutive: bool = True  # consecutive images share a window (CASA, cross-attention)
    chat_template: str = ""  # the text of data.chat_template ("" = the tokenizer's own template)

    @classmethod
    def from_config(cls, cfg, decoder: str, fusion: str = "casa") -> "ProcessorSettings":
        tok = cfg.resolved_tokenizer_path()
        if tok is None:
            raise FileNotFoundError(f"data.tokenizer_path is empty and no 'tokenizer' directory lies next to "
                                    f"{cfg.source_specs()[0].path!r}")
        return cls(str(tok), cfg.seq_length, cfg.image_seq_length, cfg.pixel_budget, cfg.min_pixels,
                   cfg.video_pixel_budget, cfg.fps, cfg.max_frames, cfg.window_per_frame, cfg.qa_windows,
                   decoder, cfg.truncate, cfg.image_token, cfg.answer_token, cfg.end_of_turn_token,
                   cfg.text_layout, cfg.image_placeholder, cfg.video_placeholder,
                   merge_consecutive=fusion != "insertion", chat_template=cfg.chat_template_text())


def make_layout(s: ProcessorSettings):
    """``chat_template`` (the tokenizer's own, or ``data.chat_template``'s), ``layout_tokens``
    (ours), or ``auto``: a template when there is one, else our layout tokens (documented fallback).

    A tokenizer the layout cannot use (no layout tokens, a template without a placeholder, ...)
    is a ``ConfigError`` naming the way out: ``casa-train`` reports it as a config error at
    start-up, not as a traceback."""
    from casa_megatron.config.errors import ConfigError

    try:
        return _make_layout(s)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _make_layout(s: ProcessorSettings):
    mode = s.text_layout
    if mode not in TEXT_LAYOUTS:
        raise ValueError(f"data.text_layout={mode!r} must be one of {TEXT_LAYOUTS}")
    if mode == "auto":
        from casa_megatron.data.tokenization import load_tokenizer

        mode = "chat_template" if s.chat_template or getattr(load_tokenizer(s.tokenizer_path), "chat_template", None) \
            else "layout_tokens"
    if mode == "chat_template":
        return ChatTemplateLayout(s.tokenizer_path, s.image_placeholder, s.video_placeholder,
                                  s.merge_consecutive, s.window_per_frame, s.fps, s.chat_template)
    try:
        return LayoutTokens(s.tokenizer_path, s.image_token, s.answer_token, s.end_of_turn_token,
                            s.window_per_frame, s.fps)
    except ValueError as e:
        if s.text_layout == "auto":
            raise ValueError(f"tokenizer at {s.tokenizer_path} has no chat_template, and our layout-token "
                             f"fallback needs its layout tokens: {e}") from e
        raise


def part_order(name: str) -> Tuple[int, str]:
    """``png`` < ``0.png`` < ``1.png`` < ``10.png``: the order media parts are assigned in."""
    m = _INDEXED.match(name)
    return (int(m.group(1)) if m else -1, name)


def media_parts(raw: RawSample) -> List[Tuple[str, bytes]]:
    """A tar sample's media parts as (extension, bytes), in index order (``jpg``, ``0.jpg``, ``1.png``...)."""
    names = [n for n in raw.parts if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTS + VIDEO_EXTS]
    return [(n.lower().rsplit(".", 1)[-1], raw.parts[n]) for n in sorted(names, key=part_order)]


def resolve_media(raw: RawSample, conv: Conversation) -> Dict[object, Tuple[str, bytes, Media]]:
    """Distinct media reference -> (extension, bytes, its first Media). References are keyed by
    path, or by identity when they carry none (then they take the sample's media parts in order)."""
    refs: Dict[object, Media] = {}
    for m in conv.media:
        refs.setdefault(m.source if m.source else id(m), m)
    if raw.files:
        out = {}
        for ref, m in refs.items():
            if m.source not in raw.files:
                raise SampleError("missing_media", f"{raw.key} in {raw.source}: no file for media "
                                  f"{m.source or '(no path)'}")
            out[ref] = (m.source.lower().rsplit(".", 1)[-1], raw.files[m.source], m)
        return out
    parts = media_parts(raw)
    if not parts and refs:
        raise SampleError("missing_media", f"{raw.key} in {raw.source}: no image or video part "
                          f"(found {sorted(raw.parts)})")
    if len(parts) != len(refs):
        raise SampleError("image_count_mismatch", f"{raw.key} in {raw.source}: the annotation refers to "
                          f"{len(refs)} media, the sample has {len(parts)} media parts")
    return {ref: (ext, data, m) for (ref, m), (ext, data) in zip(refs.items(), parts)}


class SampleProcessor:
    def __init__(self, settings: ProcessorSettings, with_layout: bool = True):
        """``with_layout`` False: decoding only (``decode_media``), no tokenizer needed."""
        self.settings = settings
        self.layout = make_layout(settings) if with_layout else None
        self._decoder = None

    @property
    def pad_id(self) -> int:
        return self.layout.pad_id

    def __getstate__(self) -> Dict:
        return {"settings": self.settings, "layout": self.layout, "_decoder": None}

    @property
    def decoder(self):
        if self._decoder is None:
            from casa_megatron.data.video import make_video_decoder

            self._decoder = make_video_decoder(self.settings.decoder)
        return self._decoder

    def __call__(self, raw: RawSample) -> TokenizedSample:
        s = self.settings
        conv = parse_conversation(sample_annotation(raw), raw.key, s.qa_windows)
        media = self.decode_media(raw, conv)
        if conv.captions and (len(media) != 1 or media[0].kind != "video"):
            raise SampleError("bad_annotation", f"{raw.key}: captions need exactly one video")
        sample = self.layout.build(raw.key, conv, media)
        sample = fit_to_budget(sample, s.seq_length, s.image_seq_length, s.truncate)
        sample.check()
        return sample

    def decode_media(self, raw: RawSample, conv: Conversation) -> List[DecodedMedia]:
        """Decoded media in the conversation's order (a reference shown twice is decoded once)."""
        s = self.settings
        decoded: Dict[object, DecodedMedia] = {}
        for ref, (ext, data, first) in resolve_media(raw, conv).items():
            if ext in IMAGE_EXTS:
                decoded[ref] = DecodedMedia("image", [process_image(data, s.max_pixels, s.min_pixels, raw.key)])
            elif ext in VIDEO_EXTS:
                clip = self.decoder.decode(data, s.fps, s.max_frames, s.video_max_pixels, s.min_pixels, raw.key,
                                           start_s=first.start or 0.0, end_s=first.end)  # a clip's bounds
                decoded[ref] = DecodedMedia("video", list(clip.frames), list(clip.times))
            else:
                raise SampleError("unsupported_media", f"{raw.key}: media {ext!r} is neither an image "
                                  f"{IMAGE_EXTS} nor a video {VIDEO_EXTS}")
        out = []
        for m in conv.media:
            item = decoded[m.source if m.source else id(m)]
            if m.kind is not None and m.kind != item.kind:
                raise SampleError("bad_annotation", f"{raw.key}: a {m.kind} part refers to a {item.kind} file")
            m.kind = item.kind
            out.append(item)
        return out


def process_or_error(processor: SampleProcessor, raw: RawSample) -> TokenizedSample | SampleError:
    """Worker entry point: data errors come back as values so one bad sample never raises."""
    try:
        return processor(raw)
    except SampleError as e:
        return e

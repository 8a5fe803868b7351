"""The sequence layout: where text, images and windows go inside one sample.

Image question answering (``qa_windows="per_turn"``, the default: every QA pair its window)::

    <bos> | [img] <image> question <answer> answer <eot> | [img] <image> question2 <answer> ...

``[img]`` is inserted before its ``<image>`` placeholder, which opens the window. Because a CASA
window only sees its own images, the image is inserted again for every QA pair (its tokens are
paid once per pair). ``per_sample`` inserts it once and keeps the whole conversation in one
window.

Video with captions, one window per frame (``window_per_frame=True``)::

    <bos> | [f0] <image> caption at t0 <eot> | [f1] <image> <eot> | [f2] <image> caption ... <eot>

A caption follows the frame sampled at or before its timestamp; a frame without a caption still
gets ``<eot>`` as its target, so the model learns when there is nothing new to say. With
``window_per_frame=False`` (and for video QA) all frames are inserted at the first of their
adjacent placeholders: one window for the clip, the captions or QA pairs after it.

Targets (``labels[t]``, ``loss_mask[t] = 1``) exist only where the *next* token is an answer or
caption token or the ``<eot>`` that ends it. ``cut_points`` are the positions after each
``<eot>``: a prefix ending there is itself a valid sample (used to truncate over-long samples).
"""

from __future__ import annotations

import bisect
from typing import List, Optional, Sequence

from torch import Tensor

from casa_megatron.data.annotations import Annotation, Caption
from casa_megatron.data.conversation import Conversation, Media, media_groups
from casa_megatron.data.records import ImageItem, SampleError, TokenizedSample
from casa_megatron.data.tokenization import TextTokenizer


class _Builder:
    def __init__(self, tok: TextTokenizer, key: str):
        self.tok, self.key, self.sp = tok, key, tok.special
        self.ids: List[int] = []
        self.labels: List[int] = []
        self.loss: List[float] = []
        self.starts: List[int] = []
        self.images: List[ImageItem] = []
        self.cuts: List[int] = []
        self.add([self.sp.bos])

    def add(self, ids: Sequence[int], trained: bool = False) -> None:
        for i in ids:
            if trained:  # predicted at the previous position
                self.labels[-1], self.loss[-1] = i, 1.0
            self.ids.append(i)
            self.labels.append(self.sp.pad)
            self.loss.append(0.0)

    def text(self, text: str, trained: bool = False) -> None:
        self.add(self.tok.encode(text, self.key), trained)

    def images_here(self, frames: Sequence[Tensor]) -> None:
        """Open a window and insert ``frames`` at it (one placeholder each, adjacent)."""
        pos = len(self.ids)
        self.starts.append(pos)
        for px in frames:
            self.images.append(ImageItem(position=pos, pixels=px))
            self.add([self.sp.image])

    def end_turn(self) -> None:
        self.add([self.sp.end_of_turn], trained=True)
        self.cuts.append(len(self.ids))

    def qa(self, question: str, answer: str) -> None:
        self.text(question)
        self.add([self.sp.answer])
        self.text(answer, trained=True)
        self.end_turn()

    def build(self, kind: str, qtype: Optional[str]) -> TokenizedSample:
        return TokenizedSample(self.key, self.ids, self.labels, self.loss, self.starts, self.images,
                               self.cuts, kind=kind, qtype=qtype)


def image_sample(key: str, ann: Annotation, pixels: Tensor, tok: TextTokenizer,
                 qa_windows: str = "per_turn") -> TokenizedSample:
    """An image and its conversation; ``pixels`` [3, H, W] uint8."""
    if not ann.turns:
        raise SampleError("bad_annotation", f"{key}: an image sample needs a 'conversation'")
    b = _Builder(tok, key)
    for i, turn in enumerate(ann.turns):
        if i == 0 or qa_windows == "per_turn":
            b.images_here([pixels])
        b.qa(turn.question, turn.answer)
    return b.build("image", ann.qtype)


def conversation_sample(key: str, conv: Conversation, media: Sequence[Sequence[Tensor]],
                        tok: TextTokenizer, generation_prompt: bool = False) -> TokenizedSample:
    """Chat messages in our layout-token form (tokenizers without a chat template).

    ``media[j]`` are the frames of the conversation's j-th media part (one for an image). User
    and system text is plain; a group of consecutive media (nothing but whitespace between)
    opens one window with one ``<image>`` per frame; an assistant turn is
    ``<answer> text <eot>`` with the text and ``<eot>`` trained. Our own format therefore gives
    exactly ``image_sample``'s layout. ``generation_prompt`` ends it with ``<answer>`` (a prompt
    for generation, evaluation).
    """
    b = _Builder(tok, key)
    j = 0
    for m in conv.messages:
        if m.role == "assistant":
            if any(isinstance(p, Media) for p in m.content):
                raise SampleError("bad_annotation", f"{key}: media inside an assistant turn needs a chat template")
            b.add([b.sp.answer])
            b.text(m.text().strip(), trained=True)
            b.end_turn()
            continue
        groups = media_groups(m.content)
        first_of = {g[0]: g for g in groups}
        between = {i for g in groups for i in range(g[0] + 1, g[-1])}  # whitespace inside a group
        media_index = {}
        for i, part in enumerate(m.content):
            if isinstance(part, Media):
                media_index[i], j = j, j + 1
        for i, part in enumerate(m.content):
            if isinstance(part, str):
                if i not in between:
                    b.text(part)
            elif i in first_of:  # the first of its group inserts the whole group
                b.images_here([px for c in first_of[i] for px in media[media_index[c]]])
    if generation_prompt:
        b.add([b.sp.answer])
    kind = "video" if any(md.kind == "video" for md in conv.media) else "image"
    return b.build(kind, conv.qtype)


def captions_per_frame(captions: Sequence[Caption], times: Sequence[float], fps: float) -> List[List[str]]:
    """Texts of the captions that follow each frame: frame k takes ``times[k] <= t < times[k+1]``
    (the last frame one sampling period); a *heard* caption (speech, ``t`` = when it ended) goes to
    the first frame at or after ``t``. Captions after the last kept frame are dropped."""
    out: List[List[str]] = [[] for _ in times]
    ends = list(times[1:]) + [times[-1] + 1.0 / fps]
    for cap in captions:
        if cap.heard:  # heard by t: the first frame sampled at or after t
            k = bisect.bisect_left(times, cap.t - 1e-9)
        else:  # on screen at t: the frame whose interval [times[k], ends[k]) holds t
            k = bisect.bisect_right(ends, cap.t)
        if k < len(times):
            out[k].append(cap.text)
    return out


def video_sample(key: str, ann: Annotation, frames: Tensor, times: Sequence[float], fps: float,
                 tok: TextTokenizer, window_per_frame: bool = True) -> TokenizedSample:
    """A clip ``frames`` [F, 3, H, W] uint8 sampled at ``times`` with captions or a conversation."""
    b = _Builder(tok, key)
    if ann.turns:  # video QA: the question is about the clip, so the clip is one window
        b.images_here(list(frames))
        for turn in ann.turns:
            b.qa(turn.question, turn.answer)
        return b.build("video", ann.qtype)
    texts = captions_per_frame(ann.captions, times, fps)
    if window_per_frame:
        for px, frame_texts in zip(frames, texts):
            b.images_here([px])
            for text in frame_texts:
                b.text(text, trained=True)
            b.end_turn()
    else:
        b.images_here(list(frames))
        for frame_texts in texts:
            for text in frame_texts:
                b.text(text, trained=True)
                b.end_turn()
        if not b.cuts:
            raise SampleError("no_targets", f"{key}: no caption falls inside the sampled frames")
    return b.build("video", ann.qtype)


def fit_to_budget(sample: TokenizedSample, max_text: int, max_image_tokens: int,
                  truncate: bool = True) -> TokenizedSample:
    """Return ``sample`` if it fits one row, else its longest prefix ending at a cut point that
    fits (``truncate``), else raise ``SampleError("too_long")``."""
    if len(sample) <= max_text and sample.num_image_tokens <= max_image_tokens:
        return sample
    if truncate:
        for cut in sorted(sample.cut_points, reverse=True):
            images = [im for im in sample.images if im.position < cut]
            if cut <= max_text and sum(im.num_tokens for im in images) <= max_image_tokens:
                loss = sample.loss_mask[:cut]
                if not any(loss):
                    break
                return TokenizedSample(sample.key, sample.input_ids[:cut], sample.labels[:cut], loss,
                                       [s for s in sample.window_starts if s < cut], images,
                                       [c for c in sample.cut_points if c <= cut],
                                       kind=sample.kind, qtype=sample.qtype, ref=sample.ref)
    raise SampleError("too_long", f"{sample.key}: {len(sample)} text / {sample.num_image_tokens} image tokens "
                      f"exceed one row ({max_text} / {max_image_tokens})" +
                      ("" if truncate else " and data.truncate is off"))


class LayoutTokens:
    """Our own layout (``<image>`` / ``<answer>`` / ``<eot>``): the fallback for tokenizers
    without a chat template, and the layout of the quality benchmark."""

    def __init__(self, path: str, image_token: str = "<image>", answer_token: str = "<answer>",
                 end_of_turn_token: str = "<eot>", window_per_frame: bool = True, fps: float = 2.0):
        self.tok = TextTokenizer(path, image_token, answer_token, end_of_turn_token)
        self.window_per_frame, self.fps = window_per_frame, fps
        self.pad_id = self.tok.special.pad

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    @property
    def tokenizer(self):
        """This thread's Hugging Face tokenizer."""
        return self.tok.tokenizer

    def build(self, key: str, conv: Conversation, media) -> TokenizedSample:
        """``media``: the decoded parts (``chat_template.DecodedMedia``) in the conversation's order."""
        if conv.captions:
            clip = media[0]
            return video_sample(key, Annotation([], conv.captions, conv.qtype), clip.frames, clip.times,
                                self.fps, self.tok, self.window_per_frame)
        return conversation_sample(key, conv, [m.frames for m in media], self.tok)

    def prompt(self, key: str, messages, media) -> TokenizedSample:
        """A generation prompt (evaluation): the messages, then ``<answer>``; no targets."""
        return conversation_sample(key, Conversation(list(messages)), [m.frames for m in media], self.tok,
                                   generation_prompt=True)

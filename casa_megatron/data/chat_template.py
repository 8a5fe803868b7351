"""The text of a sample built with the tokenizer's own chat template (``apply_chat_template``).

What comes out, for a Qwen2.5-style template and one image (``[img]`` = where the image goes)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|>[img]<|vision_end|>What colour?<|im_end|>\\n<|im_start|>assistant\\nred<|im_end|>\\n
                                                                           ^^^^^^^^^^^^^ trained

- **Placeholders leave the text stream.** The template's image placeholder (``<|image_pad|>``)
  is removed and the image is inserted at the position of the token that followed it, so its
  CASA window opens there. For token insertion the model puts the image's tokens at that same
  position, which is exactly Hugging Face's "expand the placeholder to the image's tokens"
  stream (``<|vision_start|>`` + image tokens + ``<|vision_end|>``). A video's frames all go to
  its one placeholder (one window for the clip).
- **Consecutive images share a window** (``merge_consecutive``, CASA and cross-attention): media
  parts with nothing but whitespace between them in a message are all inserted at the first
  one's position; their other placeholders are still removed and the template's markers stay
  (``<|vision_start|>[img1][img2]<|vision_end|><|vision_start|><|vision_end|>``). Off (token
  insertion) every image sits at its own placeholder, as Hugging Face's processor lays it out.
- **Loss on assistant turns only**: the text an assistant message adds to the rendered prompt
  after the generation prompt (``render(messages[:i], add_generation_prompt=True)``), trailing
  whitespace excluded, so the end-of-turn token (``<|im_end|>``) is trained and the newline
  after it is not. A token is trained when its first character lies in such a span. This needs
  a template whose generation prompt after ``messages[:i]`` is a prefix of the full rendering
  (true of Qwen2.5, Qwen3, Helium, Llama 3, ...); other templates are refused with a clear
  error. Where a turn rendered as the last one differs from the same turn inside the whole
  (Qwen3 writes an empty ``<think>\n\n</think>\n\n`` into the final assistant turn only), the
  turn is what the whole rendering has: from the generation prompt to its first end-of-turn token
  (which no text may contain: special tokens in text are refused), so every turn is trained as
  the model sees it in that conversation.
  Media markup inside an assistant turn (``<|vision_start|>``, ``<|vision_end|>``) is input,
  never a target.
- **Streaming captions** are one assistant turn, as CASA's live captioner runs it: each frame,
  then its captions and the end-of-turn token (alone when nothing new happens).
- **Cut points** (truncating over-long samples) are the ends of assistant messages and of each
  frame's captions.

The whole string is tokenised once (offsets map characters to tokens), as a Hugging Face
processor would, so the ids equal ``tokenizer(text, add_special_tokens=False)`` minus the
placeholders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from casa_megatron.data.conversation import Conversation, Media, Message, media_groups
from casa_megatron.data.interleave import captions_per_frame
from casa_megatron.data.records import ImageItem, SampleError, TokenizedSample
from casa_megatron.data.template_probe import probe_template
from casa_megatron.data.tokenization import PerThreadTokenizer



@dataclass
class DecodedMedia:
    """One media part, decoded: an image is one frame, a video its sampled frames and times."""

    kind: str  # image | video
    frames: List[Tensor]  # each [3, H, W] uint8
    times: Optional[List[float]] = None  # video only


class ChatTemplateLayout(PerThreadTokenizer):
    """Conversation + decoded media -> TokenizedSample, with the tokenizer's chat template.

    Thread-safe (one tokenizer per thread) and picklable (process workers reload it)."""

    def __init__(self, path: str, image_placeholder: str = "", video_placeholder: str = "",
                 merge_consecutive: bool = True, window_per_frame: bool = True, fps: float = 2.0,
                 chat_template: str = ""):
        self.path = str(path)
        self.template_override = chat_template or None  # data.chat_template, on every thread's tokenizer
        self.merge_consecutive, self.window_per_frame, self.fps = merge_consecutive, window_per_frame, fps
        tok = self._get()
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"tokenizer at {self.path} has no chat_template: set data.text_layout=layout_tokens "
                             "(our <image>/<answer>/<eot> layout; the tokenizer needs those tokens), give one in "
                             "data.chat_template, or use a tokenizer that ships a template")
        self.info = probe_template(tok, self.path, image_placeholder, video_placeholder)
        self.image_placeholder, self.video_placeholder = self.info.image_placeholder, self.info.video_placeholder
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.reserved = sorted({str(t) for t in tok.all_special_tokens} |
                               {t.content for t in tok.added_tokens_decoder.values() if t.special}
                               | {self.image_placeholder, self.video_placeholder or self.image_placeholder})
        alternatives = [re.escape(p) for p in {self.image_placeholder, self.video_placeholder} if p]
        self._placeholder_re = re.compile("|".join(sorted(alternatives, key=len, reverse=True)))

    @property
    def vocab_size(self) -> int:
        return len(self._get())

    # --- layout --------------------------------------------------------------------------------
    def build(self, key: str, conv: Conversation, media: Sequence[DecodedMedia]) -> TokenizedSample:
        texts = [p for m in conv.messages for p in m.content if isinstance(p, str)] + [c.text for c in conv.captions]
        for text in texts:
            if any(r in text for r in self.reserved):
                raise SampleError("reserved_token", f"{key}: text {text[:60]!r} contains a special token of the "
                                  "tokenizer")
        if conv.captions:
            messages, items = self._caption_messages(key, conv, media[0])
        else:
            messages, items = conv.messages, [m.frames for m in media]
        kind = "video" if any(m.kind == "video" for m in media) else "image"
        return self._assemble(key, messages, items, kind, conv.qtype)

    def _caption_messages(self, key: str, conv: Conversation, video: DecodedMedia
                          ) -> Tuple[List[Message], List[List[Tensor]]]:
        """Streaming captions as one assistant turn, as CASA's live captioner runs: every frame,
        then the captions that follow it and the end-of-turn token (alone when nothing new
        happens: the model learns to wait for the next frame). The annotation's ``prompt`` is
        the user turn before it (empty if none)."""
        prompt = Message("user", ["".join(p for p in conv.messages[0].content if isinstance(p, str))])
        texts = captions_per_frame(conv.captions, video.times, self.fps)
        if not self.window_per_frame:
            lines = [t for frame in texts for t in frame]
            if not lines:
                raise SampleError("no_targets", f"{key}: no caption falls inside the sampled frames")
            return [prompt, Message("assistant", [Media("video"), "\n".join(lines)])], [list(video.frames)]
        parts: List = []
        for k, frame_texts in enumerate(texts):
            end = self.info.end_of_turn if k + 1 < len(texts) else ""  # the template ends the last one
            parts += [Media("image"), " ".join(frame_texts) + end]
        return [prompt, Message("assistant", parts)], [[f] for f in video.frames]

    def _hf_messages(self, messages: Sequence[Message]) -> List[Dict]:
        out = []
        for m in messages:
            if all(isinstance(p, str) for p in m.content):
                out.append({"role": m.role, "content": "".join(m.content)})
                continue
            parts = []
            for p in m.content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                else:
                    parts.append({"type": "video" if p.kind == "video" and self.video_placeholder else "image"})
            out.append({"role": m.role, "content": parts})
        return out

    def _render(self, tok, messages: List[Dict], **kw) -> str:
        return tok.apply_chat_template(messages, tokenize=False, **kw)

    def _spans(self, key: str, tok, hf: List[Dict]) -> Tuple[str, List[Tuple[int, int]], List[int]]:
        """Full text, the trained character spans, and the character ends of assistant turns."""
        full = self._render(tok, hf)
        spans, cuts = [], []
        for i, m in enumerate(hf):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise SampleError("bad_annotation", f"{key}: the conversation opens with an assistant turn")
            prompt = self._render(tok, hf[:i], add_generation_prompt=True)
            if not full.startswith(prompt):
                raise ValueError(f"tokenizer at {self.path}: the chat template does not render a prefix of the "
                                 "messages (with its generation prompt) as a prefix of the whole (e.g. it "
                                 "rewrites earlier turns); the assistant tokens cannot be located")
            eot = self.info.end_of_turn
            upto = self._render(tok, hf[:i + 1])
            if upto.startswith(prompt) and full.startswith(upto):
                end, turn_end = len(upto.rstrip()), len(upto)
            else:  # the turn renders otherwise as the last one (Qwen3): take it as the whole has it
                at = full.find(eot, len(prompt))
                if at < 0:
                    raise ValueError(f"tokenizer at {self.path}: no end-of-turn {eot!r} after assistant turn {i} "
                                     "in the rendered conversation; the assistant tokens cannot be located")
                end = at + len(eot)
                turn_end = len(full) - len(full[end:].lstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
            # streaming captions end every frame's text inside the turn
            at = full.find(eot, len(prompt), end - 1)  # (not the turn's own end: cut after its newline)
            while at >= 0:
                cuts.append(at + len(eot))
                at = full.find(eot, at + len(eot), end - 1)
            cuts.append(turn_end)
        return full, spans, cuts

    def _strip_placeholders(self, key: str, tok, full: str, n_items: int):
        """Tokenise ``full`` once; drop the media placeholders. Returns (ids, character start of
        each kept token, insertion position of each media part, the placeholders' spans)."""
        holes = [m.span() for m in self._placeholder_re.finditer(full)]
        if len(holes) != n_items:
            raise SampleError("image_count_mismatch", f"{key}: the chat template rendered {len(holes)} "
                              f"placeholders for {n_items} media parts")
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: List[int] = []
        starts: List[int] = []  # character start of every kept token
        positions: List[int] = []  # insertion position of each media part
        h = 0
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if h < len(holes) and s < holes[h][1] and e > holes[h][0]:
                if (s, e) != holes[h]:
                    raise ValueError(f"tokenizer at {self.path}: placeholder {full[slice(*holes[h])]!r} is "
                                     "not a single token")
                positions.append(len(ids))
                h += 1
                continue
            ids.append(int(tid))
            starts.append(s)
        if positions and positions[-1] >= len(ids):
            raise SampleError("bad_annotation", f"{key}: a media part ends the text; nothing follows it")
        return ids, starts, positions, holes

    def _images(self, messages: Sequence[Message], positions: List[int],
                items: Sequence[List[Tensor]]) -> List[ImageItem]:
        positions = self._group_positions(messages, positions)
        images = [ImageItem(p, px) for p, frames in zip(positions, items) for px in frames]
        images.sort(key=lambda im: im.position)  # stable: stream order within a position
        return images

    def prompt(self, key: str, messages: Sequence[Message], media: Sequence[DecodedMedia]) -> TokenizedSample:
        """A generation prompt laid out exactly like a training sample (evaluation): the messages
        rendered with the template's generation prompt, no targets. The Hugging Face processor's
        ``apply_chat_template(..., add_generation_prompt=True)`` gives the same ids."""
        tok = self._get()
        full = self._render(tok, self._hf_messages(messages), add_generation_prompt=True)
        ids, _, positions, _ = self._strip_placeholders(key, tok, full, len(media))
        images = self._images(messages, positions, [m.frames for m in media])
        kind = "video" if any(m.kind == "video" for m in media) else "image"
        return TokenizedSample(key, ids, [self.pad_id] * len(ids), [0.0] * len(ids),
                               sorted({im.position for im in images if im.position > 0}), images, [], kind=kind)

    def stream_prefix(self, prompt: str = "") -> List[int]:
        """The ids before the first frame of streamed captions (evaluation, live captioning): the
        user turn with ``prompt`` and the assistant turn's opening as the template writes it
        before the turn's content (``_caption_messages`` puts the frames and captions there)."""
        tok, sentinel = self._get(), "CASASTREAMSENTINEL"
        text = self._render(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": sentinel}])
        return tok(text[:text.index(sentinel)], add_special_tokens=False)["input_ids"]

    def _assemble(self, key: str, messages: Sequence[Message], items: Sequence[List[Tensor]],
                  kind: str, qtype: Optional[str]) -> TokenizedSample:
        tok = self._get()
        hf = self._hf_messages(messages)
        full, spans, cut_chars = self._spans(key, tok, hf)
        ids, starts, positions, holes = self._strip_placeholders(key, tok, full, len(items))
        markup = []  # media markup (<|vision_start|> ... <|vision_end|>) is input, never a target
        for hs, he in holes:
            before, after = self.info.markup.get(full[hs:he], ("", ""))
            if full[hs - len(before):hs] == before and full[he:he + len(after)] == after:
                markup.append((hs - len(before), he + len(after)))
        trained = [any(a <= s < b for a, b in spans) and not any(a <= s < b for a, b in markup) for s in starts]
        labels = [self.pad_id] * len(ids)
        loss = [0.0] * len(ids)
        for t in range(len(ids) - 1):
            if trained[t + 1]:
                labels[t], loss[t] = ids[t + 1], 1.0
        if not any(loss):
            raise SampleError("no_targets", f"{key}: no assistant token to train on")
        images = self._images(messages, positions, items)
        cuts = sorted({sum(1 for s in starts if s < c) for c in cut_chars})
        return TokenizedSample(key, ids, labels, loss, sorted({im.position for im in images if im.position > 0}),
                               images, cuts, kind=kind, qtype=qtype)

    def _group_positions(self, messages: Sequence[Message], positions: List[int]) -> List[int]:
        """With ``merge_consecutive``, every media part of a group takes its first one's position."""
        if not self.merge_consecutive:
            return positions
        out, j = list(positions), 0
        for m in messages:
            n_media = sum(isinstance(p, Media) for p in m.content)
            for group in media_groups(m.content):
                first = j + sum(isinstance(p, Media) for p in m.content[:group[0]])
                for k in range(len(group)):
                    out[first + k] = positions[first]
            j += n_media
        return out

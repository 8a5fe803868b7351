"""``CasaProcessor``: text + images (+ videos) -> model inputs, exactly as the training pipeline
lays them out, without torchvision and without casa_megatron (this file is remote code).

**Pixels** follow casa_megatron's ``data/image_processing.py`` / ``data/patches.py``: Qwen2.5-VL
"smart resize" (sides multiples of 28 px, aspect kept, area inside ``[min_pixels, max_pixels]``,
``video_max_pixels`` for video frames), bilinear antialiased resize of uint8 pixels (torch),
per-channel normalisation, 14 px patches merge-group first. ``tiny_vit`` takes ``[h*w, C*14*14]``
per image or frame; ``qwen2_5_vl`` transformers' own layout (``[t*h*w, C*2*14*14]``, a still image
repeated to the temporal patch of 2, a video's frames in pairs: one clip with
``second_per_grid_ts = temporal_patch_size / fps``).

**Text** has two layouts (``text_layout``; ``auto``: the tokenizer's chat template when it has
one, else ours), the two of ``data/chat_template.py`` and ``data/interleave.py``:

* ``chat_template``: the tokenizer's own template renders the messages (a message whose content
  is all text as a string, media as ``{"type": "image" | "video"}`` parts; a video is an image
  part when the template has no video placeholder); the text is tokenised in **one** call; each
  media placeholder (``<|image_pad|>``, ``<|video_pad|>``, Helium's ``<image>``) becomes one
  placeholder id per image the model receives (a video: one per frame, or per temporal clip with
  the Qwen encoder). The model removes them from the text stream and inserts the images before
  the token that follows (config ``placeholders_in_stream: false``). Media with nothing but their
  markup and whitespace between them (consecutive parts of a message) share a window for
  CASA / cross-attention: their placeholders are all put at the first one's place
  (``merge_consecutive``; off for token insertion, where each keeps its own place).
* ``layout_tokens``: ``<bos> <image> question <answer> answer <eot>``, one ``<image>`` per image
  or frame, kept in the stream (the image before it); the text is split at special tokens and each
  piece tokenised alone, as the pipeline tokenises each message part.

``apply_chat_template(messages, add_generation_prompt=True)`` gives a generation prompt (images
may ride in the parts: ``{"type": "image", "image": PIL | array}``, ``{"type": "video", "video":
[frames]}``); ``stop_token_ids`` end a turn (the template's end-of-turn token, e.g.
``<|im_end|>``, and eos); ``stream_prompt_ids`` / ``frame_ids`` are the live captioner's inputs
(each frame opens a window; the caption is one assistant turn that continues).
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200.0
TEXT_LAYOUTS = ("auto", "chat_template", "layout_tokens")
STREAM_SENTINEL = "CASASTREAMSENTINEL"  # marks where an assistant turn's content starts in a rendering
IMAGE_CANDIDATES = ("<|image_pad|>", "<image>", "<|image|>", "<start_of_image>")  # as data/template_probe.py
VIDEO_CANDIDATES = ("<|video_pad|>", "<video>")

# Our layout tokens rendered by a template (tokenizers without one). A whitespace-only text part
# between two media parts is dropped (they share one window, as the pipeline does).
_MEDIA = "['image', 'video']"
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set ns = namespace(text='') %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
    "{% endfor %}<answer>{{ ns.text | trim }}<eot>"
    "{% else %}{% for part in parts %}"
    "{% if part['type'] in " + _MEDIA + " %}<image>"
    "{% elif part['type'] == 'text' and not (part['text'] | trim == '' and loop.previtem is defined and "
    "loop.nextitem is defined and loop.previtem['type'] in " + _MEDIA + " and loop.nextitem['type'] in "
    + _MEDIA + ") %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<answer>{% endif %}"
)


# --- pixels ------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int, factor: int = 28) -> Tuple[int, int]:
    """(height, width) -> multiples of ``factor``, aspect kept, area within the budget."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} px has no area")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio of a {height}x{width} px image exceeds {MAX_ASPECT:.0f}:1")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} unit")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
        while h * w > max_pixels:
            if h >= w:
                h -= factor
            else:
                w -= factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
        if h * w > max_pixels:
            return smart_resize(height, width, max_pixels, 1, factor)
    return h, w


def to_uint8_chw(image) -> torch.Tensor:
    """PIL image, HWC uint8 array or CHW uint8 tensor -> [3, H, W] uint8 RGB."""
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 3 and t.shape[0] != 3 and t.shape[-1] == 3:
            t = t.permute(2, 0, 1)
    else:
        if hasattr(image, "convert"):  # PIL
            image = np.asarray(image.convert("RGB"))
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {arr.shape}")
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    return t.contiguous()


def is_video(media) -> bool:
    """A list / tuple of frames, or a 4-D array / tensor ``[frames, ...]``."""
    return isinstance(media, (list, tuple)) or (hasattr(media, "ndim") and media.ndim == 4)


def decode_video_file(path, fps: float) -> List[np.ndarray]:
    """A video file -> its frames ``[H, W, 3]`` uint8 sampled at ``fps`` by the training pipeline's
    rule (sample k is the frame on screen at ``k / fps``, frame ``floor(k / fps * native_fps)``;
    a clip slower than ``fps`` gives each frame once). Decoded with PyAV: no torchvision."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"decoding the video {path} needs PyAV (`pip install av`); or pass its frames") from exc
    frames: List[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"cannot decode video {path}: it has no video stream")
            stream = container.streams.video[0]
            native = float(stream.average_rate or stream.guessed_rate or 0)
            if native <= 0:
                raise ValueError(f"cannot decode video {path}: unknown frame rate")
            k = 0
            for i, frame in enumerate(container.decode(stream)):
                keep = False
                while math.floor(k / fps * native + 1e-6) <= i:
                    keep |= math.floor(k / fps * native + 1e-6) == i
                    k += 1
                if keep:
                    try:  # swscale on this thread only (PyAV's default starts one per CPU); PyAV < 14: no argument
                        rgb = frame.to_ndarray(format="rgb24", threads=1)
                    except TypeError:
                        rgb = frame.to_ndarray(format="rgb24")
                    frames.append(np.ascontiguousarray(rgb))
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot decode video {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"cannot decode video {path}: no frame could be decoded")
    return frames


def resize_uint8(pixels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels.contiguous()
    x = F.interpolate(pixels[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def clip_patches(frames: torch.Tensor, encoder: str = "tiny_vit", mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, patch: int = 14, merge: int = 2,
                 temporal: int = 2) -> Tuple[torch.Tensor, List[int]]:
    """frames [n, 3, H, W] uint8 (resized) of ONE encoder input -> normalised patches, grid [t, h, w].

    ``tiny_vit``: one frame, ``[h*w, C*p*p]`` merge-group first. ``qwen2_5_vl``: ``ceil(n / T)``
    temporal patches of T frames (a still image or an odd tail repeats its last frame), transformers'
    Qwen2-VL layout ``[t*h*w, C*T*p*p]`` (casa_megatron ``data/patches.frames_to_patches``)."""
    x = (frames.float() / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    n, c, height, width = x.shape
    p, m = patch, merge
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image of {height}x{width} px is not a multiple of {p * m} px; resize it first")
    h, w = height // p, width // p
    if encoder == "tiny_vit":
        if n != 1:
            raise ValueError("tiny_vit embeds one frame per image")
        y = x[0].reshape(c, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
        return y.reshape(h * w, c * p * p), [1, h, w]
    if n % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - n % temporal, -1, -1, -1)])
    t = x.shape[0] // temporal
    y = x.reshape(t, temporal, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return y.reshape(t * h * w, c * temporal * p * p), [t, h, w]


def image_patches(pixels: torch.Tensor, encoder: str = "tiny_vit", mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD, patch: int = 14, merge: int = 2,
                  temporal: int = 2) -> Tuple[torch.Tensor, List[int]]:
    """[3, H, W] uint8 (already resized) -> normalised patches [n, D] and the grid [1, h, w]."""
    return clip_patches(pixels[None], encoder, mean, std, patch, merge, temporal)


# --- the chat template's conventions (rendered probes; as casa_megatron's data/template_probe.py) ---
def _render(tok, template: str, messages: List[Dict], **kw) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def _probe_media(tok, template: str, kind: str, configured: str, candidates: Sequence[str]
                 ) -> Tuple[Optional[str], Tuple[str, str]]:
    """(placeholder a ``kind`` part renders, (markup before, after)) or (None, ...)."""
    try:
        with_part = _render(tok, template, [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "x"}]}])
        without = _render(tok, template, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    except Exception:  # noqa: BLE001 - a template that cannot render this kind of part
        return None, ("", "")
    p = 0
    while p < min(len(with_part), len(without)) and with_part[p] == without[p]:
        p += 1
    q = 0
    while q < min(len(with_part), len(without)) - p and with_part[-1 - q] == without[-1 - q]:
        q += 1
    added = with_part[p:len(with_part) - q]
    for name in ([configured] if configured else [getattr(tok, f"{kind}_token", None), *candidates]):
        if name and name in with_part and len(tok.encode(name, add_special_tokens=False)) == 1:
            before, _, after = added.partition(name) if name in added else ("", "", "")
            return name, (before, after)
    return None, ("", "")


def _end_of_turn(tok, template: str) -> str:
    text = _render(tok, template, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}])
    ids = tok(text[text.rindex("yz") + 2:], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the chat template writes nothing after an assistant turn: no end-of-turn token")
    return tok.convert_ids_to_tokens(ids[0])


class CasaProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, chat_template: Optional[str] = None, encoder: str = "tiny_vit",
                 max_pixels: int = 448 * 448, min_pixels: int = 56 * 56, video_max_pixels: int = 224 * 224,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                 image_token: str = "<image>", text_layout: str = "auto", image_placeholder: str = "",
                 video_placeholder: str = "", merge_consecutive: bool = True, fps: float = 2.0,
                 answer_token: str = "<answer>", end_of_turn_token: str = "<eot>", **kwargs):
        self.encoder = encoder
        self.max_pixels, self.min_pixels, self.video_max_pixels = max_pixels, min_pixels, video_max_pixels
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_token, self.answer_token, self.end_of_turn_token = image_token, answer_token, end_of_turn_token
        self.text_layout, self.merge_consecutive, self.fps = text_layout, merge_consecutive, fps
        self.image_placeholder, self.video_placeholder = image_placeholder, video_placeholder
        if text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout={text_layout!r} must be one of {TEXT_LAYOUTS}")
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        own = own if own and own != DEFAULT_CHAT_TEMPLATE else None
        given = chat_template if chat_template and chat_template != DEFAULT_CHAT_TEMPLATE else None
        self.layout = text_layout if text_layout != "auto" else ("chat_template" if own else "layout_tokens")
        if self.layout == "chat_template" and not (own or given):
            raise ValueError("text_layout='chat_template' but neither the tokenizer nor the processor has a chat "
                             "template; use text_layout='layout_tokens'")
        self.template = (own or given) if self.layout == "chat_template" else DEFAULT_CHAT_TEMPLATE
        super().__init__(tokenizer, chat_template=self.template)
        if tokenizer is not None:
            self._probe()

    def _probe(self) -> None:
        """Placeholders, their markup and the end-of-turn token of this layout."""
        tok = self.tokenizer
        if self.layout == "layout_tokens":
            self._image_ph, self._video_ph, self._markup = self.image_token, None, {}
            self._eot = self.end_of_turn_token
        else:
            self._image_ph, image_markup = _probe_media(tok, self.template, "image", self.image_placeholder,
                                                        IMAGE_CANDIDATES)
            if self._image_ph is None:
                raise ValueError(f"cannot find the chat template's image placeholder (tried {IMAGE_CANDIDATES}); "
                                 "set image_placeholder in processor_config.json")
            self._video_ph, video_markup = _probe_media(tok, self.template, "video", self.video_placeholder,
                                                        VIDEO_CANDIDATES)
            self._markup = {self._image_ph: image_markup}
            if self._video_ph:
                self._markup[self._video_ph] = video_markup
            self._eot = _end_of_turn(tok, self.template)
        for name in (self._image_ph, self._video_ph, self._eot):
            if name and tok.convert_tokens_to_ids(name) in (None, tok.unk_token_id):
                raise ValueError(f"the tokenizer has no {name!r} token")
        names = [p for p in (self._image_ph, self._video_ph) if p]
        self._placeholder_re = re.compile("|".join(re.escape(p) for p in sorted(names, key=len, reverse=True)))

    # --- token ids other code needs ---------------------------------------------------------------
    def _id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def image_token_id(self) -> int:
        """The id marking an image in ``input_ids`` (the model's ``image_token_id``)."""
        return self._id(self._image_ph)

    @property
    def video_token_id(self) -> Optional[int]:
        return self._id(self._video_ph) if self._video_ph else None

    @property
    def end_of_turn(self) -> str:
        """The token that closes a turn (``<|im_end|>``, Helium's ``</s>``, our ``<eot>``)."""
        return self._eot

    @property
    def stop_token_ids(self) -> List[int]:
        """Generation stops here: the end-of-turn token, and eos."""
        out = [self._id(self._eot)]
        eos = self.tokenizer.eos_token_id
        return out + ([int(eos)] if eos is not None and eos not in out else [])

    # --- pixels -----------------------------------------------------------------------------------
    def resize(self, image, max_pixels: Optional[int] = None) -> torch.Tensor:
        """Any image -> [3, h, w] uint8, h and w multiples of patch * merge."""
        pixels = to_uint8_chw(image)
        unit = self.patch_size * self.merge_size
        size = smart_resize(pixels.shape[1], pixels.shape[2], max_pixels or self.max_pixels, self.min_pixels, unit)
        return resize_uint8(pixels, size)

    def patches(self, frames: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        return clip_patches(frames, self.encoder, self.image_mean, self.image_std, self.patch_size,
                            self.merge_size, self.temporal_patch_size)

    def process_images(self, images: Sequence, max_pixels: Optional[int] = None):
        """Still images -> (patches [n, D], grids [n_img, 3])."""
        chunks, grids = [], []
        for image in images:
            patches, grid = self.patches(self.resize(image, max_pixels)[None])
            chunks.append(patches)
            grids.append(grid)
        return torch.cat(chunks), torch.tensor(grids, dtype=torch.long)

    def media_inputs(self, media, max_pixels: Optional[int] = None) -> List[Tuple[torch.Tensor, List[int], float]]:
        """One image or video -> its encoder inputs [(patches, [t, h, w], seconds per temporal patch)]:
        an image one; a video one per frame (``tiny_vit``) or one clip of frame pairs (Qwen)."""
        if not is_video(media):
            return [(*self.patches(self.resize(media, max_pixels)[None]), 0.0)]
        frames = [self.resize(f, max_pixels or self.video_max_pixels) for f in media]
        if not frames:
            raise ValueError("a video without frames")
        if self.encoder == "tiny_vit" or self.temporal_patch_size == 1:
            return [(*self.patches(f[None]), 0.0) for f in frames]
        if any(f.shape != frames[0].shape for f in frames):
            raise ValueError("the frames of one video must have one size")
        seconds = self.temporal_patch_size / self.fps if len(frames) > 1 else 0.0
        return [(*self.patches(torch.stack(frames)), seconds)]

    # --- text + media -> model inputs ---------------------------------------------------------------
    def __call__(self, text: Union[str, List[str], None] = None, images: Optional[Sequence] = None,
                 videos: Optional[Sequence] = None, max_pixels: Optional[int] = None,
                 return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """``text`` (a string or one per row, e.g. from :meth:`apply_chat_template`) with one
        placeholder per image / video; ``images`` / ``videos`` in stream order over all rows. An
        entry of ``images`` that is a list of frames is a video rendered as an image part."""
        if text is None:
            raise ValueError(f"CasaProcessor needs text (one {self._image_ph!r} placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        queues = {"image": list(images or []),  # a video given as a file path is decoded at self.fps
                  "video": [decode_video_file(v, self.fps) if isinstance(v, (str, os.PathLike)) else v
                            for v in (videos or [])]}
        rows, inputs = [], []
        for t in texts:
            ids, row_inputs = (self._chat_ids if self.layout == "chat_template" else self._layout_ids)(t, queues)
            rows.append(ids)
            inputs += row_inputs
        if queues["image"] or queues["video"]:
            raise ValueError(f"{len(queues['image'])} image(s) / {len(queues['video'])} video(s) were given "
                             "beyond the text's placeholders")
        width = max(len(x) for x in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data = {"input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in rows], dtype=torch.long),
                "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows],
                                               dtype=torch.long)}  # left padding, as generate() wants
        if inputs:
            data["pixel_values"] = torch.cat([p for p, _, _ in inputs])
            data["image_grid_thw"] = torch.tensor([g for _, g, _ in inputs], dtype=torch.long)
            if self.encoder != "tiny_vit" and self.temporal_patch_size > 1:
                data["second_per_grid_ts"] = torch.tensor([s for _, _, s in inputs], dtype=torch.float32)
        return BatchFeature(data=data, tensor_type=None)

    def _take(self, queues: Dict[str, list], kind: str, name: str):
        if not queues[kind]:
            raise ValueError(f"the text has more {name!r} placeholders than {kind}s given")
        return queues[kind].pop(0)

    def _chat_ids(self, text: str, queues: Dict[str, list]):
        """One string rendered by the chat template -> (ids, encoder inputs in stream order)."""
        tok = self.tokenizer
        holes = [(m.start(), m.end(), m.group()) for m in self._placeholder_re.finditer(text)]
        media = [self._take(queues, "video" if ph == self._video_ph else "image", ph) for _, _, ph in holes]
        per_media = [self.media_inputs(m) for m in media]
        first = list(range(len(holes)))  # the member of each placeholder's group that holds it
        for k in range(1, len(holes)):
            if self.merge_consecutive and self._adjacent(text, holes[k - 1], holes[k]):
                first[k] = first[k - 1]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, h = [], 0
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if h < len(holes) and s < holes[h][1] and e > holes[h][0]:
                if (s, e) != holes[h][:2]:
                    raise ValueError(f"placeholder {holes[h][2]!r} is not a single token of the tokenizer")
                members = [k for k in range(len(holes)) if first[k] == h]  # [] unless h leads its group
                for k in members:  # every member of the group goes here, in order
                    ids += [self._id(holes[k][2])] * len(per_media[k])
                h += 1
                continue
            ids.append(int(tid))
        order = sorted(range(len(holes)), key=lambda k: (first[k], k))
        return ids, [x for k in order for x in per_media[k]]

    def _adjacent(self, text: str, a: Tuple[int, int, str], b: Tuple[int, int, str]) -> bool:
        """Nothing but ``a``'s markup after, whitespace and ``b``'s markup before lies between them."""
        after, before = self._markup[a[2]][1], self._markup[b[2]][0]
        between = text[a[1]:b[0]]
        return (len(between) >= len(after) + len(before) and between.startswith(after)
                and between.endswith(before) and not between[len(after):len(between) - len(before)].strip())

    def _layout_ids(self, text: str, queues: Dict[str, list]):
        """Our layout tokens: special tokens as they are, every other piece tokenised alone."""
        tok = self.tokenizer
        specials = {str(t) for t in tok.all_special_tokens} | {self.image_token, self.answer_token,
                                                               self.end_of_turn_token}
        pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        ids, inputs = [], []
        for piece in re.split(pattern, text):
            if piece == self.image_token:
                image = self._take(queues, "image", piece)
                if is_video(image):
                    raise ValueError("with our layout tokens a video is one <image> per frame: pass its frames "
                                     "as images")
                inputs += self.media_inputs(image)
                ids.append(self._id(piece))
            elif piece in specials:
                ids.append(self._id(piece))
            elif piece:
                ids += tok.encode(piece, add_special_tokens=False)
        return ids, inputs

    # --- conversations ------------------------------------------------------------------------------
    def _messages(self, conversation: List[Dict]) -> Tuple[List[Dict], List[Tuple[str, object]]]:
        """Chat messages as the pipeline renders them (payloads stripped), and the media payloads
        in stream order as (queue, payload)."""
        out, media = [], []
        for msg in conversation:
            content = msg["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            rendered = []
            for part in parts:
                kind = part.get("type")
                if kind == "text":
                    rendered.append({"type": "text", "text": part["text"]})
                    continue
                if kind not in ("image", "video"):
                    raise ValueError(f"unknown message part type {kind!r} (text / image / video)")
                payload = next((part[k] for k in (kind, "path", "url") if part.get(k) is not None), None)
                if isinstance(payload, str) and kind == "video":
                    payload = decode_video_file(payload, self.fps)
                elif isinstance(payload, str):
                    from PIL import Image

                    payload = Image.open(payload)
                if self.layout == "layout_tokens" and kind == "video":  # one <image> per frame
                    if payload is None:
                        raise ValueError("with our layout tokens a video part needs its frames")
                    rendered += [{"type": "image"} for _ in payload]
                    media += [("image", f) for f in payload]
                    continue
                as_video = kind == "video" and self._video_ph is not None
                rendered.append({"type": "video" if as_video else "image"})
                media.append(("video" if as_video else "image", payload))
            if all(p["type"] == "text" for p in rendered):
                out.append({"role": msg["role"], "content": "".join(p["text"] for p in rendered)})
            else:
                out.append({"role": msg["role"], "content": rendered})
        return out, media

    def apply_chat_template(self, conversation, chat_template: Optional[str] = None,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, images: Optional[Sequence] = None,
                            videos: Optional[Sequence] = None, **kwargs):
        """Render one conversation (or a list of them) with this model's text layout; with
        ``tokenize`` return the processor's inputs (media from the parts, else ``images`` /
        ``videos``)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        texts, queues = [], {"image": [], "video": []}
        for conv in (conversation if batched else [conversation]):
            messages, media = self._messages(conv)
            texts.append(_render(self.tokenizer, chat_template or self.template, messages,
                                 add_generation_prompt=add_generation_prompt))
            for queue, payload in media:
                queues[queue].append(payload)
        if not tokenize:
            return texts if batched else texts[0]
        if any(p is None for q in queues.values() for p in q):
            if images is None and videos is None:
                raise ValueError("media parts without payload: pass images= / videos=")
            queues = {"image": list(images or []), "video": list(videos or [])}
        out = self(text=texts, images=queues["image"], videos=queues["video"], **kwargs)
        return out if return_dict else out["input_ids"]

    # --- live captioning (each frame opens a window; the caption is one continuing assistant turn) ---
    def stream_prompt_ids(self, prompt: str = "") -> List[int]:
        """Everything before the first frame: the user turn with ``prompt`` and the assistant
        turn's opening as the template writes it before the turn's content (chat template), or
        ``<bos> prompt`` (layout tokens)."""
        tok = self.tokenizer
        if self.layout == "layout_tokens":
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            return bos + (tok.encode(prompt, add_special_tokens=False) if prompt else [])
        text = _render(tok, self.template, [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": STREAM_SENTINEL}])
        return tok(text[:text.index(STREAM_SENTINEL)], add_special_tokens=False)["input_ids"]

    def frame_ids(self) -> List[int]:
        """One frame's input: its placeholder with the template's markup around it."""
        before, after = self._markup.get(self._image_ph, ("", ""))
        tok = self.tokenizer
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return enc(before) + [self.image_token_id] + enc(after)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["CasaProcessor"]

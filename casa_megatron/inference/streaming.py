"""Live video captioning with an exported CASA model (the paper's live-captioner protocol).

Every frame opens a new window: its input is the processor's ``frame_ids()`` (the chat
template's ``<|vision_start|><|image_pad|><|vision_end|>``, or our ``<image>``), the first frame
preceded by ``stream_prompt_ids(prompt)`` (a user turn with the prompt and the assistant's header,
or ``<bos> prompt``); the caption is generated token by token until the end of the turn
(``<|im_end|>``, ``<eot>``: ``processor.stop_token_ids``) or ``max_new_tokens``. All captions
form one assistant turn that continues frame after frame, exactly the training layout of
timestamped captions (docs/data.md). The text cache persists across frames; each CASA layer
drops the previous frame's K/V when the next frame arrives, so memory grows with the text only.
As in the released captioner, a frame's last sampled token (its stop token) is not run on its
own: it is prepended to the next frame's input and enters the cache in that forward pass.

A live source may never end, and the text cache grows by every caption. ``max_context_tokens``
bounds the self-attention cache (text; with token insertion also the inserted image tokens): a
frame whose turn could take the cache past the bound starts the stream afresh
(an empty cache, the stream prompt, then the frame), as if the captioner had been started at
that frame: memory and the per-turn cost then stay flat forever, at the price of the captions'
memory of what came before (``FrameRecord.restarted``).

Per frame we record time-to-first-token (preprocessing + vision + prefill + first token), the
turn's wall and CPU time, decode tokens/s, the cache's bytes (self-attention text / CASA windows)
and memory. CPU time is what a shared machine cannot distort: with one thread it is the turn's
compute, whatever other processes do (wall time on a loaded 2-core machine is not).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch


class ContextTooSmall(ValueError):
    """``max_context_tokens`` cannot hold even one turn."""


@dataclass
class FrameRecord:
    index: int
    time_s: float
    caption: str
    tokens: List[int]
    ttft_s: float
    turn_s: float
    turn_cpu_s: float  # process CPU time of the turn: the work done, unaffected by other load
    decode_tokens_per_s: float
    text_tokens: int
    cache_bytes: Dict[str, int]
    memory_bytes: int
    restarted: bool = False  # the stream started afresh at this frame (max_context_tokens)
    stream_tokens: int = 0  # tokens in the self-attention cache: text, and inserted image tokens

    def to_json(self) -> Dict:
        return asdict(self)


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory since the last call on GPU; resident set size on CPU (from /proc)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LiveCaptioner:
    """Caption frames one by one with a persistent cache (``model`` is an HF CasaForCausalLM)."""

    model: torch.nn.Module
    processor: object
    max_new_tokens: int = 16
    prompt: str = ""
    stop_tokens: Sequence[int] = ()
    max_pixels: Optional[int] = None
    force_tokens: bool = False  # never stop early (benchmarks: a fixed number of tokens per turn)
    use_images: bool = True  # False: the placeholder stays a plain token (a text-only baseline)
    max_context_tokens: Optional[int] = None  # bound on the self-attention cache: start afresh before passing it
    cache: object = None
    frames_seen: int = 0  # since the stream (re)started
    frames_total: int = 0
    pending: List[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.stop_tokens:
            self.stop_tokens = list(self.processor.stop_token_ids)
        self.placeholders = [t for t in (self.processor.image_token_id, self.processor.video_token_id)
                             if t is not None]
        self.device = next(self.model.parameters()).device
        self.reset()
        if self.max_context_tokens is not None and self._turn_tokens() > self.max_context_tokens:
            raise ContextTooSmall(f"max_context_tokens={self.max_context_tokens} cannot hold one turn "
                                  f"({self._turn_tokens()} text tokens: the stream prompt, a frame's markup and "
                                  "max_new_tokens)")

    def reset(self) -> None:
        self.cache = self.model.new_cache()
        self.frames_seen, self.pending = 0, []

    def _turn_tokens(self, image_tokens: int = 0) -> int:
        """Tokens this frame's turn may add to the self-attention cache: its input (the pending
        token, the stream prompt on a first frame, the frame's markup, ``image_tokens`` inserted
        in the stream), then up to ``max_new_tokens`` generated, the last of which waits for the
        next frame."""
        return len(self._frame_input_ids()) + image_tokens + self.max_new_tokens - 1

    def _inserted(self, grid) -> int:
        """Image tokens the frame puts into the self-attention stream: none with CASA (its images
        are keys and values of their window only), all of them with token insertion."""
        if grid is None or self.model.config.fusion_mechanism != "insertion":
            return 0
        merge = self.model.config.vision_config.get("spatial_merge_size", 2)
        return int(grid.prod(-1).sum()) // merge ** 2

    def _cached_tokens(self) -> int:
        """Tokens in the self-attention cache: the text, and with insertion the image tokens."""
        row = self.cache.rows[0] if self.cache.rows else None
        if row is None:
            return 0
        return row.stream_tokens if self.model.config.fusion_mechanism == "insertion" else row.text_tokens

    def _restart_if_full(self, image_tokens: int) -> bool:
        """Start afresh when this turn could take the cache past ``max_context_tokens``."""
        if self.max_context_tokens is None:
            return False
        restarted = bool(self.frames_seen) and (
            self._cached_tokens() + self._turn_tokens(image_tokens) > self.max_context_tokens)
        if restarted:
            self.reset()
        if self.frames_seen == 0 and self._turn_tokens(image_tokens) > self.max_context_tokens:
            raise ContextTooSmall(f"max_context_tokens={self.max_context_tokens} cannot hold one turn "
                                  f"({self._turn_tokens(image_tokens)} tokens, the frame's {image_tokens} inserted "
                                  "image tokens included)")
        return restarted

    def _frame_input_ids(self) -> List[int]:
        ids = list(self.pending)
        if self.frames_seen == 0:
            ids += self.processor.stream_prompt_ids(self.prompt)
        return ids + self.processor.frame_ids()

    @torch.no_grad()
    def _forward(self, ids: List[int], **images) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                         **images)
        logits = out.logits[0, -1]
        if self.force_tokens:
            logits[list(self.stop_tokens)] = float("-inf")
        logits[self.placeholders] = float("-inf")  # images come from frames only
        return logits.argmax()

    def caption_frame(self, frame, time_s: float) -> FrameRecord:
        """One turn: open the frame's window, generate its caption."""
        start, cpu_start = time.perf_counter(), time.process_time()
        images, grid = {}, None
        if self.use_images:
            pixel_values, grid = self.processor.process_images([frame], self.max_pixels or self.processor.video_max_pixels)
            images = {"pixel_values": pixel_values.to(self.device, self.model.dtype),
                      "image_grid_thw": grid.to(self.device)}
        restarted = self._restart_if_full(self._inserted(grid))
        token = self._forward(self._frame_input_ids(), **images)
        _sync(self.device)
        first = time.perf_counter()
        tokens = [int(token)]
        while tokens[-1] not in self.stop_tokens and len(tokens) < self.max_new_tokens:
            tokens.append(int(self._forward([tokens[-1]])))
        _sync(self.device)
        end, cpu_end = time.perf_counter(), time.process_time()
        self.pending = [tokens[-1]]
        self.frames_seen += 1
        self.frames_total += 1
        text = [t for t in tokens if t not in self.stop_tokens]
        decode_n = len(tokens) - 1
        row = self.cache.rows[0]
        return FrameRecord(
            index=self.frames_total - 1, time_s=float(time_s),
            caption=self.processor.tokenizer.decode(text, skip_special_tokens=True).strip(), tokens=tokens,
            ttft_s=first - start, turn_s=end - start, turn_cpu_s=cpu_end - cpu_start,
            decode_tokens_per_s=decode_n / (end - first) if decode_n and end > first else 0.0,
            text_tokens=row.text_tokens, cache_bytes=self.cache.nbytes(), memory_bytes=memory_bytes(self.device),
            restarted=restarted, stream_tokens=self._cached_tokens())

    def stream(self, frames: Iterable[Tuple[float, object]]) -> Iterator[FrameRecord]:
        for time_s, frame in frames:
            yield self.caption_frame(frame, time_s)

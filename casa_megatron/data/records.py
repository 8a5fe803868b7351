"""The records that flow through the pipeline, and the two errors it distinguishes.

raw bytes (``RawSample``) --processor--> ``TokenizedSample`` (text + images, sample-relative)
--packer--> ``VLMBatch``. A ``SampleError`` means "skip this one sample and count it"; a
``ShardError`` means a whole shard (or the whole dataset) is unusable and the run must stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor


class SampleError(Exception):
    """One sample cannot be used (corrupt media, missing part, bad annotation, too long).

    ``reason`` is a short stable tag used to count skips (``stats()["skipped_by_reason"]``).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)  # both in args: the error pickles across processes
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ShardError(RuntimeError):
    """A shard (or the dataset) has nothing readable; the message names it."""


@dataclass
class RawSample:
    """One sample as stored: ``parts`` maps an extension (``png``, ``0.jpg``, ``json``...) to bytes."""

    key: str
    source: str  # shard path or manifest path, for error messages
    parts: Dict[str, bytes]
    files: Dict[str, bytes] = field(default_factory=dict)  # JSON datasets: media by the path in the annotation


@dataclass
class ImageItem:
    """One image (or video frame) to insert before text position ``position`` of its sample."""

    position: int
    pixels: Tensor  # [3, H, W] uint8, H and W multiples of 28

    @property
    def grid_hw(self) -> Tuple[int, int]:
        return self.pixels.shape[1] // 14, self.pixels.shape[2] // 14

    @property
    def num_tokens(self) -> int:
        """LM tokens after the 2x2 patch merge."""
        return (self.pixels.shape[1] // 28) * (self.pixels.shape[2] // 28)


@dataclass
class TokenizedSample:
    """One sample laid out for packing; every position is relative to the sample's first token.

    ``labels[t]`` is the token to predict at ``t`` (``input_ids[t + 1]`` on answer targets,
    pad elsewhere) and ``loss_mask[t]`` is 1 exactly there. ``window_starts`` marks where the
    sample's CASA windows open (each QA pair / frame); every image sits on one.
    """

    key: str
    input_ids: List[int]
    labels: List[int]
    loss_mask: List[float]
    window_starts: List[int]  # sorted positions (0 is implied by the sample start)
    images: List[ImageItem] = field(default_factory=list)  # sorted by position
    cut_points: List[int] = field(default_factory=list)  # prefix lengths that are valid samples
    kind: str = "image"  # image | video
    qtype: Optional[str] = None  # coarse | fine | ... (from the annotation, for benchmarks)
    ref: Tuple[int, int] = (-1, -1)  # (epoch, position in the rank's epoch order), for resume

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_image_tokens(self) -> int:
        return sum(im.num_tokens for im in self.images)

    def check(self) -> None:
        """Internal consistency; raises AssertionError naming the sample (a bug, not bad data)."""
        n = len(self.input_ids)
        assert len(self.labels) == n and len(self.loss_mask) == n, self.key
        starts = set(self.window_starts) | {0}
        for im in self.images:
            assert 0 <= im.position < n and im.position in starts, f"{self.key}: image off a window start"
        positions = [im.position for im in self.images]
        assert positions == sorted(positions), f"{self.key}: images out of stream order"


@dataclass
class SampleInfo:
    """Where a sample landed in a packed batch (for benchmarks, debugging and tests)."""

    key: str
    row: int
    start: int
    length: int
    num_images: int
    kind: str
    qtype: Optional[str]
    ref: Tuple[int, int]


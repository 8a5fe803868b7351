"""The video decoder interface: encoded bytes in, the planned frames (resized) out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional

from torch import Tensor

from casa_megatron.data.video.sampling import VideoInfo


@dataclass
class DecodedClip:
    frames: Tensor  # [F, 3, h, w] uint8 RGB, h and w multiples of 28
    indices: List[int]  # frame index of each kept frame in the stream
    times: List[float]  # sampling time (s) of each kept frame
    info: VideoInfo


class VideoDecoder(ABC):
    """Decode the frames chosen by ``sampling.plan_frames`` and resize them to the plan's size.

    Implementations raise ``SampleError`` for anything wrong with the input (corrupt, truncated,
    empty, unsupported codec) and let programming errors through.
    """

    name: str

    @abstractmethod
    def decode(self, data: bytes, fps: float, max_frames: int, max_pixels: int,
               min_pixels: int, key: str = "?", start_s: float = 0.0,
               end_s: Optional[float] = None) -> DecodedClip: ...

"""Frames of a video at a fixed rate, yielded as they are decoded (a live stream's view).

Sample k is the frame on screen at ``t_k = k / fps``: frame ``floor(t_k * native_fps)``, the
rule of ``data/video/sampling.py``, so captions line up with the training data's timestamps.
PyAV decodes on the CPU, sequentially; frames are yielded one by one, so a stream that breaks
mid-way has already delivered its earlier frames (the caller keeps their captions). DALI (GPU)
decodes the planned frames of a whole clip at once through the data pipeline's decoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from casa_megatron.data.video.cpu import rgb_array


class VideoDecodeError(RuntimeError):
    """The video cannot be opened or decoded at all (nothing was delivered)."""


class StreamBroken(RuntimeError):
    """Decoding failed after some frames were delivered."""


def iter_frames(path: str | Path, fps: float = 2.0, max_frames: Optional[int] = None,
                decoder: str = "cpu") -> Iterator[Tuple[float, torch.Tensor]]:
    """Yield ``(time_s, frame [3, H, W] uint8)`` at ``fps``."""
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"cannot decode video {path}: no such file")
    if decoder == "dali":
        yield from _dali_frames(path, fps, max_frames)
        return
    if decoder != "cpu":
        raise ValueError(f"decoder {decoder!r} must be 'cpu' or 'dali'")
    yield from _pyav_frames(path, fps, max_frames)


def _pyav_frames(path: Path, fps: float, max_frames: Optional[int]):
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"cannot decode video {path}: {e}") from e
    delivered = 0
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"cannot decode video {path}: it has no video stream")
        stream = container.streams.video[0]
        native = float(stream.average_rate or stream.guessed_rate or 0)
        if native <= 0:
            raise VideoDecodeError(f"cannot decode video {path}: unknown frame rate")
        k = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                while math.floor(k / fps * native + 1e-6) <= i:
                    if math.floor(k / fps * native + 1e-6) == i:
                        rgb = np.ascontiguousarray(rgb_array(frame))
                        yield k / fps, torch.from_numpy(rgb).permute(2, 0, 1)
                        delivered += 1
                        if max_frames is not None and delivered >= max_frames:
                            return
                    k += 1
        except av.error.FFmpegError as e:
            if delivered == 0:
                raise VideoDecodeError(f"cannot decode video {path}: {e}") from e
            raise StreamBroken(f"{path}: decoding stopped after {delivered} frames ({e})") from e
        if delivered == 0:
            raise VideoDecodeError(f"cannot decode video {path}: no frame could be decoded")
    finally:
        container.close()


def _dali_frames(path: Path, fps: float, max_frames: Optional[int]):
    """GPU path (DALI): the data pipeline's decoder, whole clip, then frame by frame, at the video's
    own size like PyAV's frames (the processor resizes both the same way)."""
    from casa_megatron.data.records import SampleError
    from casa_megatron.data.video import make_video_decoder

    try:
        clip = make_video_decoder("dali").decode(path.read_bytes(), fps, max_frames or 10 ** 6, max_pixels=10 ** 9,
                                                 min_pixels=1, key=str(path), native_size=True)
    except SampleError as e:
        raise VideoDecodeError(f"cannot decode video {path}: {e}") from e
    for t, frame in zip(clip.times, clip.frames):
        yield t, frame.cpu()

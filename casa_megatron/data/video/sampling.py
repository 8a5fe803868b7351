"""Which frames of a clip to keep: shared by every decoder so they agree frame for frame.

Frames are sampled uniformly in time at ``fps``: sample k is taken at ``t_k = k / fps`` and is
the frame on screen at that time, ``floor(t_k * native_fps)`` (frame i covers
``[i / native_fps, (i + 1) / native_fps)``). Long clips keep their first ``max_frames`` samples
rather than being thinned out, so the sampling rate (2 fps in the paper) and the alignment with
timestamped captions stay exact.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from casa_megatron.data.image_processing import smart_resize
from casa_megatron.data.records import SampleError

_EPS = 1e-6


@dataclass
class VideoInfo:
    """Container metadata read without decoding a frame."""

    codec: str
    width: int
    height: int
    native_fps: float
    num_frames: int  # frames in the stream (0 if the container does not say and counting failed)


@dataclass
class FramePlan:
    indices: List[int]  # frame indices to decode, increasing
    times: List[float]  # sampling time (s) of each kept frame
    size: Tuple[int, int]  # output (height, width), multiples of 28


def frame_index(k: int, fps: float, native_fps: float) -> int:
    """Index of the frame on screen at the k-th sampling time."""
    return int(math.floor(k / fps * native_fps + _EPS))


def sample_frame_indices(num_frames: int, native_fps: float, fps: float, max_frames: int,
                         start_s: float = 0.0, end_s: Optional[float] = None) -> Tuple[List[int], List[float]]:
    """Indices and times of the kept frames of a ``num_frames``-frame clip; with ``start_s`` /
    ``end_s``, of the part ``[start_s, end_s)`` of it, sampled on the same grid ``k / fps`` (times
    stay video times)."""
    if native_fps <= 0 or fps <= 0:
        raise ValueError(f"fps must be positive (native {native_fps}, sampling {fps})")
    indices, times = [], []
    k = max(0, math.ceil(start_s * fps - _EPS))
    while len(indices) < max_frames:
        if end_s is not None and k / fps >= end_s - _EPS:
            break
        i = frame_index(k, fps, native_fps)
        if i >= num_frames:
            break
        if not indices or i > indices[-1]:  # sampling faster than the clip: no duplicates
            indices.append(i)
            times.append(k / fps)
        k += 1
    return indices, times


def plan_frames(info: VideoInfo, fps: float, max_frames: int, max_pixels: int,
                min_pixels: int, key: str = "?", start_s: float = 0.0, end_s: Optional[float] = None) -> FramePlan:
    if info.num_frames <= 0:
        raise SampleError("empty_clip", f"{key}: the video has no frames")
    indices, times = sample_frame_indices(info.num_frames, info.native_fps, fps, max_frames, start_s, end_s)
    if not indices:
        raise SampleError("empty_clip", f"{key}: no frame in the clip [{start_s}, {end_s}) s of a "
                          f"{info.num_frames / info.native_fps:.1f} s video")
    try:
        size = smart_resize(info.height, info.width, max_pixels, min_pixels)
    except ValueError as e:
        raise SampleError("bad_video_size", f"{key}: {e}") from e
    return FramePlan(indices, times, size)


def probe_video(data: bytes, key: str = "?") -> VideoInfo:
    """Read codec, size, frame rate and frame count with PyAV (demuxing only, no decoding)."""
    import av

    if not data:
        raise SampleError("empty_file", f"{key}: video file is empty")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SampleError("no_video_stream", f"{key}: the container has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx is None or ctx.codec is None:  # FFmpeg knows no codec for the stream's tag
                raise SampleError("unsupported_codec", f"{key}: no decoder for the video stream's codec")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise SampleError("no_frame_rate", f"{key}: the video stream has no frame rate")
            num_frames = int(stream.frames or 0)
            if num_frames <= 0:  # e.g. WebM: count the packets (cheap, no decoding)
                num_frames = sum(1 for p in container.demux(stream) if p.size)
                _check_not_truncated(num_frames, container.duration, float(rate), key)
            return VideoInfo(codec=ctx.codec.name, width=int(ctx.width), height=int(ctx.height),
                             native_fps=float(rate), num_frames=num_frames)
    except SampleError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise SampleError("corrupt_video", f"{key}: cannot read the container ({e})") from e


def _check_not_truncated(counted: int, duration_us, native_fps: float, key: str) -> None:
    """Containers such as WebM state their duration up front; far fewer packets than that
    duration implies means the file was cut (its decodable prefix is not the sample)."""
    if not duration_us or counted <= 0:
        return
    expected = duration_us / 1e6 * native_fps
    if counted < 0.9 * expected - 1:
        raise SampleError("truncated_video", f"{key}: {counted} frames found but the container "
                          f"declares {duration_us / 1e6:.2f} s ({expected:.0f} frames)")

"""Frames of a video at a fixed rate, yielded as they are decoded (a live stream's view).

Sample k is the frame on screen at ``t_k = k / fps``: frame ``floor(t_k * native_fps)``, the
rule of ``data/video/sampling.py``, so captions line up with the training data's timestamps.
PyAV decodes on the CPU, sequentially; frames are yielded one by one, so a stream that breaks
mid-way has already delivered its earlier frames (the caller keeps their captions). DALI (GPU)
decodes the planned frames of a whole clip at once through the data pipeline's decoder.

Live sources (``is_live``: an RTSP / RTMP / UDP / SRT URL, a pipe, a capture device such as
``/dev/video0`` with ``input_format="v4l2"``) have no file to index and start at an arbitrary
timestamp: their frames are placed by their own timestamps, relative to the first one, with the
same rule (sample k is the frame on screen at ``k / fps``: the last one that started by then,
known once the next one arrives). ``pacing.live`` reads them on a thread of their own.
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


LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "srt", "tcp")


def is_live(source: str | Path) -> bool:
    """A source that delivers frames at its own pace and may never end: a streaming URL
    (``LIVE_SCHEMES``), ``-`` / ``pipe:N`` (standard input, a file descriptor) or a device under
    ``/dev``. An ``http(s)://`` URL is usually a file (read like one); ``--live`` says otherwise."""
    s = str(source)
    return s == "-" or s.startswith(("pipe:", "/dev/")) or s.split("://", 1)[0].lower() in LIVE_SCHEMES and "://" in s


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def iter_frames(path: str | Path, fps: float = 2.0, max_frames: Optional[int] = None,
                decoder: str = "cpu", live: Optional[bool] = None, input_format: Optional[str] = None,
                timeout_s: float = 10.0) -> Iterator[Tuple[float, torch.Tensor]]:
    """Yield ``(time_s, frame [3, H, W] uint8)`` at ``fps``. ``live`` (default: ``is_live``): place
    frames by their timestamps as they arrive (a stream, a pipe, a camera); ``input_format``: the
    FFmpeg demuxer or device (``v4l2``, ``avfoundation``, ``mpegts``...); ``timeout_s``: how long a
    URL may take to open or to deliver more data before it counts as broken."""
    source = str(path)
    live = is_live(source) if live is None else live
    if decoder not in ("cpu", "dali"):
        raise ValueError(f"decoder {decoder!r} must be 'cpu' or 'dali'")
    if (live or _is_url(source)) and decoder == "dali":
        raise VideoDecodeError(f"cannot decode {source} with DALI: it decodes whole files; use the CPU decoder")
    if live:
        yield from _live_frames(source, fps, max_frames, input_format, timeout_s)
        return
    if not _is_url(source) and not Path(source).is_file():
        raise VideoDecodeError(f"cannot decode video {source}: no such file")
    if decoder == "dali":
        yield from _dali_frames(Path(source), fps, max_frames)
        return
    yield from _pyav_frames(source, fps, max_frames, input_format, timeout_s)


def _open(source: str, input_format: Optional[str], timeout_s: float):
    import av

    try:
        return av.open("pipe:0" if source == "-" else source, mode="r", format=input_format,
                       timeout=timeout_s if _is_url(source) else None)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"cannot decode video {source}: {e}") from e


def _pyav_frames(path: str, fps: float, max_frames: Optional[int], input_format: Optional[str] = None,
                 timeout_s: float = 10.0):
    """A file's frames at ``fps``: sample k is frame ``floor(k / fps * native_fps)``."""
    def by_index(stream, native: float):
        if native <= 0:
            raise VideoDecodeError(f"cannot decode video {path}: unknown frame rate")
        k = 0
        for i, frame in enumerate(stream.container.decode(stream)):
            while math.floor(k / fps * native + 1e-6) <= i:
                if math.floor(k / fps * native + 1e-6) == i:
                    yield k / fps, frame
                k += 1

    yield from _delivered(path, _open(path, input_format, timeout_s), by_index, max_frames)


def _live_frames(source: str, fps: float, max_frames: Optional[int], input_format: Optional[str],
                 timeout_s: float):
    """A live source's frames at ``fps``, placed by their timestamps relative to the first frame's:
    sample k is the last frame that started by ``t_k = k / fps`` (to within a millionth of a
    frame, as ``_pyav_frames``' index rule), yielded when the frame after it arrives (one source
    frame of latency) or the stream ends."""
    def by_time(stream, native: float):
        eps = 1e-6 / native if native > 0 else 1e-9
        first, prev, k = None, None, 0  # the first frame's time; (time since it, frame) of the last frame
        for frame in stream.container.decode(stream):
            if frame.time is None:
                raise VideoDecodeError(f"cannot place the frames of {source} in time: they carry no timestamps")
            first = frame.time if first is None else first
            now = (frame.time - first, frame)
            while prev is not None and k / fps + eps < now[0]:  # prev was on screen at t_k
                yield k / fps, prev[1]
                k += 1
            prev = now
        if prev is None:
            return
        # the stream ended: the last frame stays on screen for one frame interval
        end = prev[0] + (1 / native if native > 0 else eps)
        while k / fps + eps < end:
            yield k / fps, prev[1]
            k += 1

    yield from _delivered(source, _open(source, input_format, timeout_s), by_time, max_frames)


def _delivered(source: str, container, sampler, max_frames: Optional[int]):
    """``sampler(stream, native_fps)``'s ``(time_s, frame)`` as ``(time_s, [3, H, W] uint8)``,
    converted on this (the decoding) thread, up to ``max_frames``; the container closed at the
    end. An FFmpeg error is a VideoDecodeError before the first frame, a StreamBroken after it."""
    import av

    delivered = 0
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"cannot decode video {source}: it has no video stream")
        try:
            stream = container.streams.video[0]
            for t, frame in sampler(stream, float(stream.average_rate or stream.guessed_rate or 0)):
                yield t, _tensor(frame)
                delivered += 1
                if max_frames is not None and delivered >= max_frames:
                    return
        except av.error.FFmpegError as e:
            if delivered == 0:
                raise VideoDecodeError(f"cannot decode video {source}: {e}") from e
            raise StreamBroken(f"{source}: decoding stopped after {delivered} frames ({e})") from e
        if delivered == 0:
            raise VideoDecodeError(f"cannot decode video {source}: no frame could be decoded")
    finally:
        container.close()


def _tensor(frame) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb_array(frame))).permute(2, 0, 1)  # [3, H, W] uint8


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

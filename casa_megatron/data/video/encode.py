"""Encode frames to MP4 (H.264) or WebM (VP9) bytes with PyAV: for generated datasets and tests.

The ``av`` wheel bundles libx264 and libvpx, so no system FFmpeg is needed.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

CODECS = {"h264": ("mp4", "libx264", ".mp4"), "vp9": ("webm", "libvpx-vp9", ".webm")}


def encode_video(frames: Sequence[np.ndarray], fps: int, codec: str = "h264",
                 lossless: bool = False, gop: Optional[int] = None) -> bytes:
    """frames: F arrays [H, W, 3] uint8 (H, W even) -> encoded container bytes.

    ``lossless`` asks for the codec's lossless mode (still yuv420p, so colours are exact only up to
    the RGB<->YUV rounding); tests use it to check decoded pixels against known values.
    ``gop``: a keyframe every ``gop`` frames (seeking tests), else the encoder's default.
    """
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: choose one of {sorted(CODECS)}")
    if not len(frames):
        raise ValueError("no frames to encode")
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width} must be even for yuv420p")
    fmt, encoder, _ = CODECS[codec]
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec == "h264":
            # mbtree off: x264's macroblock-tree rate control gave different bytes for the same
            # frames from one process to the next (3 of 48 generated clips, a single encoder
            # thread did not help); without it the same frames always encode the same
            stream.options = {"qp": "0"} if lossless else {"crf": "20", "preset": "veryfast", "x264-params": "mbtree=0"}
        else:
            stream.options = {"lossless": "1"} if lossless else {"crf": "30", "b": "0"}
        if gop is not None:
            stream.options = {**stream.options, "g": str(gop), "keyint_min": str(gop)}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def extension(codec: str) -> str:
    return CODECS[codec][2]

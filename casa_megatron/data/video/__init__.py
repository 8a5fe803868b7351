"""Video decoding: a CPU decoder (PyAV) and a GPU decoder (NVIDIA DALI), one frame plan for both."""

from __future__ import annotations

import torch

from casa_megatron.data.video.base import DecodedClip, VideoDecoder
from casa_megatron.data.video.sampling import FramePlan, VideoInfo, plan_frames, probe_video, sample_frame_indices

__all__ = ["DecodedClip", "FramePlan", "VideoDecoder", "VideoInfo", "make_video_decoder",
           "plan_frames", "probe_video", "resolve_decoder", "sample_frame_indices"]


def resolve_decoder(kind: str) -> str:
    """``auto`` -> ``dali`` when DALI imports and a CUDA GPU exists, else ``cpu``."""
    from casa_megatron.data.video.dali import dali_available

    if kind == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "dali"):
        raise ValueError(f"video decoder {kind!r} must be one of 'auto', 'cpu', 'dali'")
    return kind


def make_video_decoder(kind: str = "auto") -> VideoDecoder:
    kind = resolve_decoder(kind)
    if kind == "dali":
        from casa_megatron.data.video.dali import DaliDecoder

        return DaliDecoder()
    from casa_megatron.data.video.cpu import PyAVDecoder

    return PyAVDecoder()

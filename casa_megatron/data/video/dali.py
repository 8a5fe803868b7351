"""GPU video decoding with NVIDIA DALI (NVDEC through the ``mixed`` backend).

Why this shape:
- Samples live inside tar shards, so the encoded bytes are fed from memory with
  ``fn.external_source`` into ``fn.decoders.video`` (the in-memory decoder). The file readers
  (``fn.experimental.readers.video``, ``fn.readers.video``) want file paths and do their own
  sharding and shuffling, which would fight the loader's deterministic, resumable order.
- Frame choice is not DALI's: ``sampling.plan_frames`` (shared with the CPU decoder) gives the
  indices, passed per sample through the ``frames`` argument input, so both decoders return the
  same frame indices and the same output size. ``fn.resize`` (linear, antialiased) resizes on
  the GPU to the planned size; pixels differ from the CPU path only by decoder/resampler rounding.
- Older DALI releases only have ``fn.experimental.decoders.video`` (no frame selection): then all
  frames are decoded and the planned ones picked and resized with torch.
- Without a GPU, DALI's CPU backend is used; its bundled libavcodec cannot decode H.264, HEVC,
  AV1 or MPEG-4 (measured), so such clips are rejected up front as ``unsupported_codec``.
- A DALI pipeline is not thread-safe: each loader thread builds its own (``threading.local``).
  Frames are copied back to host memory because packing and collation run on the CPU.

``nvidia.dali`` is imported lazily; importing this module never needs it.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

import numpy as np
import torch

from casa_megatron.data.image_processing import resize_uint8
from casa_megatron.data.records import SampleError
from casa_megatron.data.video.base import DecodedClip, VideoDecoder
from casa_megatron.data.video.sampling import plan_frames, probe_video

DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU backend can decode


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder(VideoDecoder):
    name = "dali"

    def __init__(self, device_id: Optional[int] = None, num_threads: int = 2,
                 use_gpu: Optional[bool] = None):
        if not dali_available():
            raise ImportError("data.decoder='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                              "(or -cuda130), or use data.decoder='cpu'")
        self.use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) \
            if self.use_gpu else None
        self.num_threads = num_threads
        self._local = threading.local()
        from nvidia.dali import fn

        # fn.decoders.video (DALI >= 1.4x) takes per-sample frame indices; older releases only
        # have fn.experimental.decoders.video, which decodes every frame.
        self.selects_frames = hasattr(fn, "decoders") and hasattr(fn.decoders, "video")

    # --- pipeline --------------------------------------------------------------------------
    def _pipeline(self):
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._local.pipe = self._build()
        return pipe

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        backend = "mixed" if self.use_gpu else "cpu"

        @pipeline_def(batch_size=1, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            if not self.selects_frames:
                return fn.experimental.decoders.video(encoded, device=backend)  # all frames
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
            width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
            video = fn.decoders.video(encoded, device=backend, frames=frames)  # [F, H, W, C]
            return fn.resize(video, resize_x=width, resize_y=height,
                             interp_type=types.INTERP_LINEAR, antialias=True)

        p = pipe()
        p.build()
        return p

    # --- decode ----------------------------------------------------------------------------
    def decode(self, data: bytes, fps: float, max_frames: int, max_pixels: int,
               min_pixels: int, key: str = "?", start_s: float = 0.0,
               end_s: Optional[float] = None, native_size: bool = False) -> DecodedClip:
        """``native_size``: frames at the video's own size (the live captioner's processor resizes
        them itself, exactly as it does PyAV's frames); else at the planned size."""
        info = probe_video(data, key)
        if not self.use_gpu and info.codec not in DALI_CPU_CODECS:
            raise SampleError("unsupported_codec", f"{key}: DALI's CPU backend cannot decode "
                              f"{info.codec!r} (only {DALI_CPU_CODECS}); use a GPU or decoder='cpu'")
        plan = plan_frames(info, fps, max_frames, max_pixels, min_pixels, key, start_s, end_s)
        if native_size:
            plan = dataclasses.replace(plan, size=(info.height, info.width))
        pipe = self._pipeline()
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        if self.selects_frames:
            pipe.feed_input("frames", [np.asarray(plan.indices, dtype=np.int32)])
            pipe.feed_input("height", [np.array(plan.size[0], dtype=np.float32)])
            pipe.feed_input("width", [np.array(plan.size[1], dtype=np.float32)])
        try:
            (out,) = pipe.run()
        except RuntimeError as e:  # DALI reports decoder failures as RuntimeError
            self._local.pipe = None  # a failed pipeline is not reused
            raise SampleError("corrupt_video", f"{key}: DALI could not decode the clip ({e})") from e
        host = out.as_cpu() if hasattr(out, "as_cpu") else out
        frames = torch.from_numpy(np.array(host[0]))  # [F, H, W, 3] uint8
        if not self.selects_frames:
            if frames.shape[0] <= plan.indices[-1]:
                raise SampleError("truncated_video", f"{key}: DALI decoded {frames.shape[0]} frames, "
                                  f"frame {plan.indices[-1]} was planned")
            frames = frames[plan.indices]
        clip = frames.permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W]
        if tuple(clip.shape[-2:]) != plan.size:
            clip = resize_uint8(clip, plan.size)
        return DecodedClip(clip, plan.indices, plan.times, info)

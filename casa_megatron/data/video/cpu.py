"""CPU video decoding with PyAV (FFmpeg bundled in the ``av`` wheel: H.264, HEVC, VP9, AV1...).

Decodes sequentially and converts only the planned frames. Sequential decoding beats seeking
for short clips at 2 fps (seeking to far keyframes re-decodes whole GOPs anyway), and it makes
frame indices exact: frame i is the i-th frame in presentation order, as in DALI. A clip that
starts late in its file (LiveCC's ``video_start``) seeks to the keyframe before its first frame
and numbers frames from their timestamps from there (the plan's indices assume a constant frame
rate already).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

from casa_megatron.data.image_processing import resize_uint8
from casa_megatron.data.records import SampleError
from casa_megatron.data.video.base import DecodedClip, VideoDecoder
from casa_megatron.data.video.sampling import plan_frames, probe_video


def rgb_array(frame):
    """A decoded frame as ``[H, W, 3]`` uint8 RGB, converted by swscale on the calling thread.

    PyAV's default (``threads=0``) gives each converted frame a pool of swscale threads, one per
    CPU. A process forked while such a frame lives (megatron's checkpoint save forks its writers
    while loader threads decode) inherits the pool without its threads, and freeing the frame
    there waits forever in ``pthread_cond_destroy``: a CI run's ``casa-train`` hung in its save.
    One thread per conversion also keeps loader workers, which decode many clips side by side,
    from oversubscribing the CPUs. The pixels are the same. PyAV < 14 has no ``threads``
    argument (and no pool)."""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:
        return frame.to_ndarray(format="rgb24")


class PyAVDecoder(VideoDecoder):
    name = "cpu"
    seek_min_frames = 256  # seek when the first planned frame is at least this far into the file

    def __init__(self, threads: int = 1):
        self.threads = threads  # FFmpeg threads per clip; loader workers parallelise across clips

    def decode(self, data: bytes, fps: float, max_frames: int, max_pixels: int,
               min_pixels: int, key: str = "?", start_s: float = 0.0,
               end_s: Optional[float] = None) -> DecodedClip:
        import av

        info = probe_video(data, key)
        plan = plan_frames(info, fps, max_frames, max_pixels, min_pixels, key, start_s, end_s)
        wanted = set(plan.indices)
        last = plan.indices[-1]
        frames = []
        try:
            with av.open(io.BytesIO(data), mode="r") as container:
                stream = container.streams.video[0]
                if not _has_decoder(info.codec):
                    raise SampleError("unsupported_codec", f"{key}: no decoder for codec {info.codec!r}")
                stream.codec_context.thread_count = self.threads
                index_of = self._seek(container, stream, info, plan.indices[0])
                for n, frame in enumerate(container.decode(stream)):
                    i = n if index_of is None else index_of(frame)
                    if i in wanted:
                        rgb = rgb_array(frame)  # [H, W, 3]
                        frames.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))
                    if i >= last:
                        break
        except SampleError:
            raise
        except av.error.FFmpegError as e:
            raise SampleError("corrupt_video", f"{key}: decoding failed ({e})") from e
        except (av.codec.codec.UnknownCodecError, NotImplementedError) as e:
            raise SampleError("unsupported_codec", f"{key}: {e}") from e
        if len(frames) < len(plan.indices):
            raise SampleError("truncated_video", f"{key}: decoded {len(frames)} of the "
                              f"{len(plan.indices)} planned frames (the stream ended early)")
        clip = resize_uint8(torch.stack(frames), plan.size)  # [F, 3, h, w]
        return DecodedClip(clip, plan.indices, plan.times, info)

    def _seek(self, container, stream, info, first: int):
        """Seek to the keyframe at or before frame ``first`` when it is far into the file; returns
        frame -> index (from its timestamp), or None to count frames from the file's start."""
        if first < self.seek_min_frames or stream.time_base is None:
            return None
        origin = stream.start_time or 0
        ticks_per_frame = 1.0 / (float(stream.time_base) * info.native_fps)
        container.seek(origin + int(first * ticks_per_frame), stream=stream, backward=True, any_frame=False)
        return lambda frame: int(round((frame.pts - origin) / ticks_per_frame)) if frame.pts is not None else -1


def _has_decoder(codec: str) -> bool:
    import av

    try:
        av.codec.Codec(codec, "r")
    except Exception:  # UnknownCodecError, or a name FFmpeg knows only as an encoder
        return False
    return True

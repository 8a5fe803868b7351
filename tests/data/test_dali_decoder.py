"""The DALI decoder: same frame indices, timestamps and sizes as the CPU decoder, close pixels.

nvidia-dali (the test extra installs nvidia-dali-cuda130, which imports without a GPU) runs our
pipeline with its CPU operators on VP9 .webm clips here; H.264 and the GPU backend need a CUDA
GPU. Without DALI only the "not installed" message is checked.
"""

from __future__ import annotations

import pytest
import torch
from data.helpers import colour_clip, frame_colour

from casa_megatron.data.video.cpu import PyAVDecoder
from casa_megatron.data.video.dali import dali_available
from casa_megatron.data.video.encode import encode_video

needs_dali_gpu = pytest.mark.skipif(not (dali_available() and torch.cuda.is_available()),
                                    reason="needs a CUDA GPU and nvidia-dali")
needs_dali = pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali (pip install -e '.[test]')")
ARGS = dict(fps=2.0, max_frames=32, max_pixels=224 * 224, min_pixels=56 * 56)


def textured_clip(num_frames: int = 40, height: int = 96, width: int = 128, block: int = 8) -> list:
    """A random colour texture of ``block`` px squares moving 2 px per frame: every frame differs,
    so a wrong frame or a shifted resize shows."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // block + 1, 2 * width // block + 1, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base, block, axis=0), block, axis=1)[:height]
    return [np.ascontiguousarray(base[:, 2 * i: 2 * i + width]) for i in range(num_frames)]


@needs_dali
def test_dali_cpu_matches_pyav_on_vp9_frames_and_timestamps():
    """DALI's CPU operators on VP9: the planned frames (identified by their colour), the same
    timestamps and sizes as PyAV, and pixels within decoder/resampler rounding."""
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(colour_clip(30, 64, 96), fps=10, codec="vp9", lossless=True)
    dali = DaliDecoder(use_gpu=False).decode(data, **ARGS)
    cpu = PyAVDecoder().decode(data, **ARGS)
    assert dali.indices == cpu.indices == [0, 5, 10, 15, 20, 25]
    assert dali.times == cpu.times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert dali.frames.shape == cpu.frames.shape == (6, 3, 56, 84) and dali.frames.dtype == torch.uint8
    for frame, index in zip(dali.frames, dali.indices):
        mean = frame.float().mean(dim=(1, 2))
        assert (mean - torch.tensor(frame_colour(index), dtype=torch.float)).abs().max() <= 8
    assert (dali.frames.float() - cpu.frames.float()).abs().max() <= 8


@needs_dali
def test_dali_cpu_matches_pyav_on_a_lossy_textured_vp9_clip():
    """Lossy VP9, inter frames, a resize: DALI's frames are PyAV's. Measured: mean RGB error
    ~6.6 levels (chroma upsampling differs at the colour edges; the channel mean, ~luma, is within
    ~3), against ~60 levels between neighbouring planned frames of this texture."""
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(textured_clip(), fps=10, codec="vp9")
    args = dict(ARGS, fps=3.0)
    dali = DaliDecoder(use_gpu=False).decode(data, **args)
    cpu = PyAVDecoder().decode(data, **args)
    assert dali.indices == cpu.indices and len(dali.indices) >= 10 and dali.times == cpu.times
    assert dali.frames.shape == cpu.frames.shape
    d, c = dali.frames.float(), cpu.frames.float()  # [F, 3, H, W]
    err = (d - c).abs().mean(dim=(1, 2, 3))  # [F]
    luma_err = (d.mean(1) - c.mean(1)).abs().mean(dim=(1, 2))  # [F]
    neighbour = (c[1:] - c[:-1]).abs().mean(dim=(1, 2, 3))  # [F-1]
    assert err.max() <= 10 and luma_err.max() <= 5 and neighbour.min() > 5 * err.max()


@needs_dali
def test_dali_cpu_decodes_a_clip_of_the_file_like_pyav():
    """video_start / video_end (LiveCC clips): the same planned frames and video times as PyAV."""
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(colour_clip(40, 64, 96), fps=10, codec="vp9", lossless=True)
    args = dict(ARGS, start_s=1.2, end_s=3.0)
    dali = DaliDecoder(use_gpu=False).decode(data, **args)
    cpu = PyAVDecoder().decode(data, **args)
    assert dali.indices == cpu.indices == [15, 20, 25] and dali.times == cpu.times == [1.5, 2.0, 2.5]
    for frame, index in zip(dali.frames, dali.indices):
        mean = frame.float().mean(dim=(1, 2))
        assert (mean - torch.tensor(frame_colour(index), dtype=torch.float)).abs().max() <= 8
    assert (dali.frames.float() - cpu.frames.float()).abs().max() <= 8


@needs_dali
def test_dali_cpu_rejects_h264_as_unsupported_codec():
    from casa_megatron.data.records import SampleError
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(colour_clip(10, 64, 96), fps=10, codec="h264")
    with pytest.raises(SampleError, match="unsupported_codec"):
        DaliDecoder(use_gpu=False).decode(data, **ARGS)


@needs_dali_gpu
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_dali_gpu_matches_cpu_decoder(codec):
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(colour_clip(30, 64, 96), fps=10, codec=codec, lossless=True)
    args = dict(fps=2.0, max_frames=32, max_pixels=224 * 224, min_pixels=56 * 56)
    gpu = DaliDecoder().decode(data, **args)
    cpu = PyAVDecoder().decode(data, **args)
    assert gpu.indices == cpu.indices == [0, 5, 10, 15, 20, 25]
    assert gpu.frames.shape == cpu.frames.shape and gpu.frames.dtype == torch.uint8
    for frame, index in zip(gpu.frames, gpu.indices):
        mean = frame.float().mean(dim=(1, 2))
        assert (mean - torch.tensor(frame_colour(index), dtype=torch.float)).abs().max() <= 8


@needs_dali
def test_dali_rejects_corrupt_clip():
    from casa_megatron.data.records import SampleError
    from casa_megatron.data.video.dali import DaliDecoder

    with pytest.raises(SampleError):
        DaliDecoder().decode(bytes(range(256)) * 20, 2.0, 8, 224 * 224, 56 * 56)
    data = encode_video(colour_clip(30, 64, 96), fps=10, codec="vp9")
    with pytest.raises(SampleError):  # valid header, truncated stream: DALI itself must fail cleanly
        DaliDecoder(use_gpu=False).decode(data[: len(data) // 3], **ARGS)


@pytest.mark.skipif(dali_available(), reason="nvidia-dali is installed")
def test_dali_missing_gives_actionable_error():
    from casa_megatron.data.video.dali import DaliDecoder

    with pytest.raises(ImportError, match="decoder='cpu'"):
        DaliDecoder()


# --- plumbing check without DALI --------------------------------------------------------------
# A stand-in for the few DALI calls the decoder makes (external_source, decoders.video with a
# per-sample ``frames`` argument, resize with resize_x/resize_y, pipeline_def/feed_input/run),
# backed by PyAV and torch. It checks our wiring (what is fed, how outputs are read back and laid
# out), not DALI itself; the GPU tests above do that.

class _Node:
    def __init__(self, compute):
        self.compute = compute  # feeds -> value


def _fake_dali():
    import io
    import types as pytypes

    import av
    import numpy as np

    from casa_megatron.data.image_processing import resize_uint8

    def external_source(name, dtype, ndim):
        return _Node(lambda feeds: feeds[name])

    def video(encoded, device, frames):
        assert device == "mixed"

        def run(feeds):
            with av.open(io.BytesIO(encoded.compute(feeds).tobytes())) as c:
                decoded = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
            return np.stack([decoded[i] for i in frames.compute(feeds)])  # [F, H, W, C]
        return _Node(run)

    def resize(video_node, resize_x, resize_y, interp_type, antialias):
        def run(feeds):
            frames = torch.from_numpy(video_node.compute(feeds)).permute(0, 3, 1, 2)
            size = (int(resize_y.compute(feeds)), int(resize_x.compute(feeds)))
            return resize_uint8(frames, size).permute(0, 2, 3, 1).numpy()
        return _Node(run)

    class Pipe:
        def __init__(self, graph):
            self.graph, self.feeds = graph, {}

        def build(self):
            self.out = self.graph()

        def feed_input(self, name, batch):
            assert len(batch) == 1  # batch_size=1
            self.feeds[name] = batch[0]

        def run(self):
            result = self.out.compute(self.feeds)
            return (pytypes.SimpleNamespace(as_cpu=lambda: [result]),)

    def pipeline_def(**kwargs):
        assert kwargs["batch_size"] == 1
        return lambda graph: (lambda: Pipe(graph))

    fn = pytypes.SimpleNamespace(external_source=external_source, resize=resize,
                                 decoders=pytypes.SimpleNamespace(video=video))
    dali_types = pytypes.SimpleNamespace(UINT8="u8", INT32="i32", FLOAT="f32", INTERP_LINEAR="linear")
    dali = pytypes.ModuleType("nvidia.dali")
    dali.fn, dali.pipeline_def, dali.types = fn, pipeline_def, dali_types
    nvidia = pytypes.ModuleType("nvidia")
    nvidia.dali = dali
    return nvidia, dali


def test_dali_decoder_wiring_with_a_stand_in(monkeypatch):
    import sys

    nvidia, dali = _fake_dali()
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.dali", dali)
    from casa_megatron.data.records import SampleError
    from casa_megatron.data.video.dali import DaliDecoder

    data = encode_video(colour_clip(30, 64, 96), fps=10, codec="h264", lossless=True)
    args = dict(fps=2.0, max_frames=4, max_pixels=224 * 224, min_pixels=56 * 56)
    gpu = DaliDecoder(device_id=0, use_gpu=True).decode(data, **args)
    cpu = PyAVDecoder().decode(data, **args)
    assert gpu.indices == cpu.indices == [0, 5, 10, 15]
    assert gpu.frames.shape == cpu.frames.shape == (4, 3, 56, 84)
    assert torch.equal(gpu.frames, cpu.frames)  # same resampler in the stand-in: identical
    with pytest.raises(SampleError, match="unsupported_codec"):  # DALI's CPU backend lacks H.264
        DaliDecoder(use_gpu=False).decode(data, **args)

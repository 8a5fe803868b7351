"""Frame planning and the PyAV CPU decoder against clips of known content."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from data.helpers import colour_clip, frame_colour

from casa_megatron.data.image_processing import smart_resize
from casa_megatron.data.records import SampleError
from casa_megatron.data.video import make_video_decoder, resolve_decoder
from casa_megatron.data.video.cpu import PyAVDecoder
from casa_megatron.data.video.encode import encode_video
from casa_megatron.data.video.sampling import probe_video, sample_frame_indices

TOLERANCE = 6  # max |decoded - true| per channel (8-bit) after lossless yuv420p round trip


def test_frame_indices_at_two_fps():
    assert sample_frame_indices(30, 10.0, 2.0, 32) == ([0, 5, 10, 15, 20, 25], [0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert sample_frame_indices(30, 10.0, 2.0, 3)[0] == [0, 5, 10]  # max_frames keeps the first ones
    ntsc = 30000 / 1001
    assert sample_frame_indices(100, ntsc, 2.0, 4)[0] == [0, 14, 29, 44]  # frame on screen at k/2 s
    assert sample_frame_indices(4, 2.0, 10.0, 32)[0] == [0, 1, 2, 3]  # oversampling: no duplicates


def test_frame_indices_of_a_clip_keep_the_video_time_grid():
    """[start, end) of a longer video (LiveCC's video_start / video_end): the same grid k / fps,
    times in video time, the end excluded, max_frames counted from the clip's start."""
    assert sample_frame_indices(30, 10.0, 2.0, 32, 0.5, 2.0) == ([5, 10, 15], [0.5, 1.0, 1.5])
    assert sample_frame_indices(30, 10.0, 2.0, 32, 0.7, None) == ([10, 15, 20, 25], [1.0, 1.5, 2.0, 2.5])
    assert sample_frame_indices(30, 10.0, 2.0, 2, 1.0, None)[0] == [10, 15]
    assert sample_frame_indices(30, 10.0, 2.0, 32, 5.0, 6.0) == ([], [])  # beyond the video: nothing


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_cpu_decoder_exact_frames_and_colours(codec):
    data = encode_video(colour_clip(30, 64, 96), fps=10, codec=codec, lossless=True)
    clip = PyAVDecoder().decode(data, fps=2.0, max_frames=32, max_pixels=224 * 224, min_pixels=56 * 56)
    assert clip.indices == [0, 5, 10, 15, 20, 25]
    assert clip.times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert clip.info.codec == codec and clip.info.num_frames == 30 and clip.info.native_fps == 10.0
    assert tuple(clip.frames.shape) == (6, 3, *smart_resize(64, 96, 224 * 224, 56 * 56)) == (6, 3, 56, 84)
    assert clip.frames.dtype == torch.uint8
    for frame, index in zip(clip.frames, clip.indices):
        mean = frame.float().mean(dim=(1, 2))
        # neighbouring frames differ by >= 37 levels, so this pins the exact frame index
        assert (mean - torch.tensor(frame_colour(index), dtype=torch.float)).abs().max() <= TOLERANCE, index


def test_cpu_decoder_respects_pixel_budget_and_max_frames():
    data = encode_video(colour_clip(20, 120, 160), fps=10, codec="h264")
    clip = PyAVDecoder().decode(data, fps=4.0, max_frames=3, max_pixels=56 * 84, min_pixels=28 * 28)
    assert clip.indices == [0, 2, 5]  # floor(k / 4 * 10)
    h, w = clip.frames.shape[-2:]
    assert h * w <= 56 * 84 and h % 28 == 0 and w % 28 == 0


def test_probe_counts_frames_of_webm_without_frame_count():
    data = encode_video(colour_clip(12, 32, 32), fps=6, codec="vp9")
    info = probe_video(data)
    assert info.num_frames == 12 and info.native_fps == 6.0


def test_decoder_speed_is_reported():
    """Decode throughput on a 10 s 224x168 H.264 clip at 25 fps of the generated moving-shape kind
    (printed; run with -s to see it)."""
    import numpy as np

    from casa_megatron.data.synthetic_media import render_clip

    frames, _ = render_clip(np.random.default_rng(0), width=224, height=168, fps=25, seconds=10.0)
    data = encode_video(frames, fps=25, codec="h264")
    start = time.perf_counter()
    clip = PyAVDecoder().decode(data, fps=2.0, max_frames=64, max_pixels=224 * 224, min_pixels=56 * 56)
    seconds = time.perf_counter() - start
    assert clip.indices[-1] == 237 and len(clip.indices) == 20
    print(f"\nPyAV: 10 s clip, 250 frames 224x168 decoded, 20 kept, in {seconds:.3f} s "
          f"({250 / seconds:.0f} decoded frames/s, {20 / seconds:.0f} sampled frames/s)")
    assert seconds < 10.0


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty_file"), ("garbage", "corrupt_video"), ("truncated_mp4", "corrupt_video"),
    ("truncated_webm", "truncated_video"), ("unknown_codec", "unsupported_codec"),
    ("no_video_stream", "no_video_stream"),
])
def test_bad_videos_raise_sample_errors(case, reason):
    good_mp4 = encode_video(colour_clip(30, 64, 96), fps=10, codec="h264")
    good_webm = encode_video(colour_clip(30, 64, 96), fps=10, codec="vp9")
    data = {
        "empty": b"",
        "garbage": bytes(range(256)) * 20,
        "truncated_mp4": good_mp4[: len(good_mp4) // 2],
        "truncated_webm": good_webm[: len(good_webm) // 3],
        "unknown_codec": good_mp4.replace(b"avc1", b"zzzz"),  # a codec tag FFmpeg has no decoder for
        "no_video_stream": _audio_only(),
    }[case]
    with pytest.raises(SampleError) as info:
        PyAVDecoder().decode(data, 2.0, 32, 224 * 224, 56 * 56, key=f"clip_{case}")
    assert info.value.reason == reason and f"clip_{case}" in str(info.value)


def _audio_only() -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    return buf.getvalue()


def test_auto_decoder_is_cpu_without_gpu_or_dali():
    from casa_megatron.data.video.dali import dali_available

    if dali_available() and torch.cuda.is_available():
        pytest.skip("DALI and a GPU are present: auto picks DALI")
    assert resolve_decoder("auto") == "cpu"
    assert make_video_decoder("auto").name == "cpu"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_decoder("ffmpeg")


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_a_late_clip_is_decoded_after_a_seek_with_the_same_frames(codec, monkeypatch):
    """A clip 12 s into a 20 s file (keyframe every 2 s): the decoder seeks to the keyframe
    before it and numbers frames by timestamp; the frames equal those of decoding from the file's
    start, and far fewer frames are decoded."""
    from casa_megatron.data.video.cpu import PyAVDecoder

    rng = np.random.default_rng(0)
    frames = [np.ascontiguousarray(np.kron(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8),
                                           np.ones((16, 16, 1), dtype=np.uint8))) for _ in range(200)]
    data = encode_video(frames, fps=10, codec=codec, gop=20)
    args = dict(fps=2.0, max_frames=8, max_pixels=64 * 96, min_pixels=28 * 28, start_s=12.0, end_s=14.0)
    seeking = PyAVDecoder()
    seeking.seek_min_frames = 64
    counted = PyAVDecoder()
    counted.seek_min_frames = 10 ** 9  # never seek: count from the start
    decoded = {}
    import av

    real_decode = av.container.InputContainer.decode

    for name, decoder in (("seek", seeking), ("count", counted)):
        seen = []

        def decode(self, *a, **k):
            for frame in real_decode(self, *a, **k):
                seen.append(frame.pts)
                yield frame

        monkeypatch.setattr(av.container.InputContainer, "decode", decode)
        decoded[name] = (decoder.decode(data, key="late", **args), len(seen))
        monkeypatch.undo()
    (a, n_seek), (b, n_count) = decoded["seek"], decoded["count"]
    assert a.indices == b.indices == [120, 125, 130, 135] and a.times == b.times == [12.0, 12.5, 13.0, 13.5]
    assert torch.equal(a.frames, b.frames)
    assert n_count >= 136 and n_seek <= 40, (n_seek, n_count)  # from the keyframe at 12 s (or 10 s)


def test_a_process_forked_while_converted_frames_live_does_not_hang():
    """megatron's checkpoint save forks writer processes while loader threads may hold decoded
    frames. With PyAV's default (``threads=0``: one swscale thread per CPU) a forked child that
    frees such a frame waits forever in ``pthread_cond_destroy`` (swscale's thread pool exists
    only in the parent): a CI run hung there, in ``casa-train``'s save. ``rgb_array`` converts
    on the calling thread: the child exits."""
    import gc
    import io
    import os

    import av

    from casa_megatron.data.video.cpu import rgb_array

    data = encode_video(colour_clip(4, 64, 96), fps=10, codec="h264", lossless=True)
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(container.streams.video[0]))
    arrays = [rgb_array(frame) for frame in frames]  # each frame keeps its reformatter
    assert arrays[0].shape == (64, 96, 3) and arrays[0].dtype == np.uint8
    pid = os.fork()
    if pid == 0:  # the child frees what it inherited, then exits
        frames.clear()
        gc.collect()
        os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung freeing the parent's decoded frames")

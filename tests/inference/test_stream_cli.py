"""``casa-stream``: captions a real encoded video at 2 fps, writes JSON + PNG; bad videos fail with a
clear error; a stream that breaks mid-way keeps its captions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from casa_megatron.data.video.encode import encode_video


def _video(tmp_path, frames=30, fps=10, name="clip.mp4"):
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(frames)]
    path = tmp_path / name
    path.write_bytes(encode_video(clip, fps=fps))
    return path


def test_stream_cli_writes_captions_json_and_plot(exported, tmp_path, capsys):
    from casa_megatron.inference.cli import main

    video = _video(tmp_path)
    out = tmp_path / "out"
    code = main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out),
                 "--max-new-tokens", "3", "--decoder", "cpu"])
    assert code == 0
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    result = json.loads((out / "stream.json").read_text())
    frames = result["frames"]
    assert [f["time_s"] for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # 3 s at 10 fps -> 2 fps
    assert len(printed) == 6 and printed[1].startswith("[00:00.5]")
    assert all(f["ttft_s"] > 0 and 1 <= len(f["tokens"]) <= 3 for f in frames)
    sa = [f["cache_bytes"]["self_attention"] for f in frames]
    assert sa == sorted(sa) and sa[0] > 0  # the text cache only grows
    assert len({f["cache_bytes"]["casa_windows"] for f in frames[1:]}) >= 1
    assert (out / "stream.png").stat().st_size > 1000 and result["stopped"] is None
    # the captions as subtitles: a cue per frame that said something, until the next frame
    spoken = [f for f in frames if f["caption"].strip()]
    vtt = (out / "captions.vtt").read_text().split("\n\n")
    assert vtt[0] == "WEBVTT" and len([c for c in vtt[1:] if c]) == len(spoken) >= 1
    srt = [c for c in (out / "captions.srt").read_text().split("\n\n") if c]
    for n, (cue, frame) in enumerate(zip(srt, spoken), 1):
        index, times, text = cue.split("\n", 2)
        following = [f["time_s"] for f in frames if f["time_s"] > frame["time_s"]]
        end = following[0] if following else frame["time_s"] + 0.5
        assert index == str(n) and text == frame["caption"].strip()
        assert times == f"00:00:0{frame['time_s']:.3f} --> 00:00:0{end:.3f}".replace(".", ",")


def test_undecodable_video_is_named(exported, tmp_path, capsys):
    from casa_megatron.inference.cli import main

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    code = main([str(bad), "--model", str(exported[0] / "casa_parallel"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot decode video" in err and str(bad) in err
    assert not (tmp_path / "o" / "stream.json").exists()


@pytest.mark.parametrize("folder, message", [
    ({}, "is not a Hugging Face model folder (no config.json)"),
    ({"config.json": '{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}'},
     "model_type 'qwen2', expected 'casa'"),
    ({"config.json": '{"model_type": "casa"}'}, "has no processor_config.json"),
])
def test_a_model_folder_that_is_not_an_export_is_named(tmp_path, capsys, folder, message):
    """Checked before transformers is asked (whose own error was a traceback:
    ``ValueError: Unrecognized model in ...``), and before any frame is decoded."""
    from casa_megatron.inference.cli import main

    model = tmp_path / "model"
    model.mkdir()
    for name, text in folder.items():
        (model / name).write_text(text)
    code = main([str(_video(tmp_path, frames=5)), "--model", str(model), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("casa-stream: ") and message in err and str(model) in err
    assert not (tmp_path / "o").exists()


def test_stream_stopping_midway_keeps_captions(exported, tmp_path, monkeypatch):
    from casa_megatron.inference import cli
    from casa_megatron.inference.frames import StreamBroken, iter_frames

    video = _video(tmp_path)

    def breaking(path, fps, max_frames, decoder, **options):
        for i, item in enumerate(iter_frames(path, fps, max_frames, decoder, **options)):
            if i == 3:
                raise StreamBroken(f"{path}: connection lost")
            yield item

    monkeypatch.setattr(cli, "iter_frames", breaking)
    out = tmp_path / "out"
    code = cli.main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out),
                     "--max-new-tokens", "2", "--decoder", "cpu"])
    result = json.loads((out / "stream.json").read_text())
    assert code == 1 and len(result["frames"]) == 3 and "connection lost" in result["stopped"]


def test_truncated_file_delivers_its_first_frames(tmp_path):
    """A real file cut in the middle (WebM streams): decoding yields the frames before the cut,
    then ends or reports the break; it never fails silently with nothing."""
    from casa_megatron.inference.frames import StreamBroken, VideoDecodeError, iter_frames

    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(40)]
    data = encode_video(clip, fps=10, codec="vp9")
    path = tmp_path / "cut.webm"
    path.write_bytes(data[: len(data) // 2])
    got = []
    try:
        for t, frame in iter_frames(path, 2.0):
            got.append(t)
    except StreamBroken:
        pass
    assert 0 < len(got) < 8
    with pytest.raises(VideoDecodeError, match="missing.webm"):
        list(iter_frames(tmp_path / "missing.webm", 2.0))


def test_stream_with_the_dali_decoder_on_cpu_equals_pyav(exported, tmp_path):
    """``casa-stream --decoder dali`` (the GPU session's decoder) runs here with DALI's CPU
    operators on a VP9 clip: the same frame times and frame sizes as PyAV (it resized them to the
    training plan's size before, so the processor resized twice), pixels within the decoders'
    known chroma difference, and a caption for every frame."""
    from casa_megatron.data.video.dali import dali_available
    from casa_megatron.inference.cli import main
    from casa_megatron.inference.frames import iter_frames

    if not dali_available():
        pytest.skip("nvidia-dali is not installed")
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # smooth blocks: codec error stays small
    clip = [np.kron(np.roll(base, i // 5, axis=1), np.ones((8, 8, 1), dtype=np.uint8)) for i in range(30)]
    video = tmp_path / "clip.webm"
    video.write_bytes(encode_video(clip, fps=10, codec="vp9"))
    dali = list(iter_frames(video, 2.0, decoder="dali"))
    pyav = list(iter_frames(video, 2.0, decoder="cpu"))
    assert [t for t, _ in dali] == [t for t, _ in pyav] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    for (_, a), (_, b) in zip(dali, pyav):  # native size, as PyAV's (the processor resizes both)
        assert a.shape == b.shape == (3, 64, 96)
        # chroma upsampling differs at colour edges (tests/data/test_dali_decoder.py); luma agrees
        assert (a.float() - b.float()).abs().mean() <= 10 and (a.float().mean(0) - b.float().mean(0)).abs().mean() <= 5
    results = {}
    for decoder in ("dali", "cpu"):
        out = tmp_path / decoder
        assert main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out),
                     "--max-new-tokens", "3", "--decoder", decoder]) == 0
        results[decoder] = json.loads((out / "stream.json").read_text())
    assert [f["time_s"] for f in results["dali"]["frames"]] == [f["time_s"] for f in results["cpu"]["frames"]]
    assert len(results["dali"]["frames"]) == 6


def test_stream_in_bf16_as_on_a_gpu(exported, tmp_path):
    """``--dtype bfloat16`` (the GPU setting) on CPU: every frame captioned, the cache half the
    float32 run's bytes at every frame (the same tokens, two bytes each)."""
    from casa_megatron.inference.cli import main

    video = _video(tmp_path)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out),
                     "--max-new-tokens", "3", "--decoder", "cpu", "--dtype", dtype]) == 0
        runs[dtype] = json.loads((out / "stream.json").read_text())["frames"]
    assert len(runs["bfloat16"]) == len(runs["float32"]) == 6
    for low, full in zip(runs["bfloat16"], runs["float32"]):
        if low["text_tokens"] == full["text_tokens"]:  # same caption lengths -> exactly half the bytes
            assert 2 * low["cache_bytes"]["self_attention"] == full["cache_bytes"]["self_attention"]
    assert any(low["text_tokens"] == full["text_tokens"] for low, full in zip(runs["bfloat16"], runs["float32"]))

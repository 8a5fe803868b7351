"""Live sources (``inference/frames.is_live``, ``pacing.live``): a stream read as it arrives. Its
frames, placed by their own timestamps, are those the file reader gives the same bytes; the feed
hands the consumer the newest frame and counts the rest; ``casa-stream`` captions a pipe fed in
real time and ends a live stream on Ctrl-C with exit 0."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import socketserver
import threading
import time

import numpy as np
import pytest
import torch

from casa_megatron.inference.frames import StreamBroken, VideoDecodeError, is_live, iter_frames
from casa_megatron.inference.pacing import PacingStats, live


def _mpegts(frames: int = 30, fps: int = 10) -> bytes:
    """A clip in a container that streams (MPEG-TS: no index at the end), H.264 without B-frames."""
    import av

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast", "bf": "0"}
        for _ in range(frames):
            image = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _pipe(data: bytes, seconds: float = 0.0) -> tuple:
    """A pipe fed with ``data`` by a thread, spread evenly over ``seconds`` (a live sender)."""
    read, write = os.pipe()
    chunks = [data[i:i + 2048] for i in range(0, len(data), 2048)]

    def send():
        with os.fdopen(write, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                time.sleep(seconds / len(chunks))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return read, thread


def test_sources_that_are_live():
    assert all(is_live(s) for s in ("-", "pipe:3", "/dev/video0", "rtsp://cam/1", "UDP://0.0.0.0:1234", "srt://h:9"))
    assert not any(is_live(s) for s in ("clip.mp4", "http://host/clip.mp4", "https://h/live.m3u8", "file:///a.mp4"))


def test_a_live_pipe_and_a_url_give_the_files_frames(tmp_path):
    """The same bytes as a file (frames by index), through a pipe (live: by timestamps, as they
    arrive) and over HTTP (a file behind a URL): the same times and the same pixels."""
    data = _mpegts()
    path = tmp_path / "clip.ts"
    path.write_bytes(data)
    reference = list(iter_frames(path, 2.0))
    assert [t for t, _ in reference] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]

    fd, sender = _pipe(data)
    try:
        piped = list(iter_frames(f"pipe:{fd}", 2.0))
    finally:
        sender.join()
        os.close(fd)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        fetched = list(iter_frames(f"{url}/clip.ts", 2.0))
        with pytest.raises(VideoDecodeError, match="missing.ts"):
            list(iter_frames(f"{url}/missing.ts", 2.0))
        server.shutdown()
    for got in (piped, fetched):
        assert [t for t, _ in got] == [t for t, _ in reference]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, reference))
    fd, sender = _pipe(data)
    try:
        assert [t for t, _ in iter_frames(f"pipe:{fd}", 2.0, max_frames=2)] == [0.0, 0.5]
    finally:
        os.close(fd)
        sender.join()
    with pytest.raises(VideoDecodeError, match="DALI"):
        next(iter_frames("rtsp://camera/stream", 2.0, decoder="dali"))


def test_the_live_feed_gives_the_newest_frame_and_counts_the_rest():
    """A source sending a frame every 50 ms to a consumer busy 120 ms per frame: it gets frames in
    order, each the newest that had arrived, and every other frame is counted as dropped; a
    fast consumer gets them all; an error reaches the consumer after the frames before it."""
    def source(count, interval, fail_after=None):
        for k in range(count):
            time.sleep(interval)
            if k == fail_after:
                raise StreamBroken("connection lost")
            yield k * interval, torch.tensor([k])

    stats = PacingStats()
    got = []
    for t, frame in live(source(20, 0.05), stats):
        assert stats.arrived[t] >= stats.start and t not in stats.dropped
        got.append(t)
        time.sleep(0.12)
    assert got == sorted(got) and got[-1] == pytest.approx(19 * 0.05)
    assert sorted(got + stats.dropped) == pytest.approx([k * 0.05 for k in range(20)])
    assert len(stats.dropped) >= 3

    stats = PacingStats()
    assert [t for t, _ in live(source(5, 0.1), stats)] == pytest.approx([k * 0.1 for k in range(5)])
    assert stats.dropped == []

    got = []
    with pytest.raises(StreamBroken, match="connection lost"):
        for t, _ in live(source(10, 0.01, fail_after=3), PacingStats()):
            got.append(t)
    assert got and got[-1] == pytest.approx(0.02)


def _stream_pipe(cli, model: str, out, seconds: float) -> dict:
    """``casa-stream pipe:N`` on the clip sent through a pipe over ``seconds``: its stream.json."""
    fd, sender = _pipe(_mpegts(), seconds=seconds)
    try:
        assert cli.main([f"pipe:{fd}", "--model", model, "--out", str(out), "--max-new-tokens", "2"]) == 0
    finally:
        sender.join()
        os.close(fd)
    return json.loads((out / "stream.json").read_text())


def test_casa_stream_captions_a_live_pipe_and_ctrl_c_ends_it(exported, tmp_path, capsys, monkeypatch):
    from casa_megatron.inference import cli
    from casa_megatron.inference.streaming import LiveCaptioner

    model = str(exported[0] / "casa_parallel")
    out = tmp_path / "out"
    result = _stream_pipe(cli, model, out, seconds=2.5)  # 3 s of video sent over 2.5 s
    report = result["realtime"]
    assert result["live"] is True and result["stopped"] is None
    assert sorted([f["time_s"] for f in result["frames"]] + report["dropped_times_s"]) == [0.0, 0.5, 1.0, 1.5, 2.0,
                                                                                           2.5]
    assert report["captioned"] == len(result["frames"]) >= 2 and all(f["lag_s"] > 0 for f in result["frames"])
    assert "realtime at 2.0 fps: " in capsys.readouterr().out

    calls = []
    original = LiveCaptioner.caption_frame

    def interrupted(self, frame, time_s):
        calls.append(time_s)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, frame, time_s)

    monkeypatch.setattr(LiveCaptioner, "caption_frame", interrupted)
    result = _stream_pipe(cli, model, out, seconds=1.0)
    assert result["stopped"] == "interrupted" and len(result["frames"]) == 1
    assert "stopped; 1 frames captioned" in capsys.readouterr().err

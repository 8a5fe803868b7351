"""inference/pacing.py: frames delivered at a live camera's pace, with a fake clock: the consumer
gets the newest arrived frame, waits when none has arrived, and the frames it missed are counted;
casa-stream --realtime reports lag and drops."""

from __future__ import annotations

import json

from casa_megatron.inference.pacing import PacingStats, realtime


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


def _consume(work_s, frames=10, interval=0.5):
    """Video times the consumer got, and those dropped, when each frame takes ``work_s`` to caption."""
    clock, stats = FakeClock(), PacingStats()
    got = []
    for t, _ in realtime(((k * interval, None) for k in range(frames)), stats, clock, clock.sleep):
        assert t <= clock() - stats.start + 1e-9  # never a frame from the future
        got.append(t)
        clock.now += work_s
    return got, stats.dropped


def test_a_fast_captioner_gets_every_frame_and_waits_for_each():
    got, dropped = _consume(0.2)
    assert got == [k * 0.5 for k in range(10)] and dropped == []


def test_a_slow_captioner_gets_the_newest_frame_and_the_missed_ones_are_counted():
    # 1.2 s per caption at 2 fps: done at 1.2 (frames 0.5, 1.0 arrived: 1.0 taken, 0.5 dropped),
    # done at 2.4 (1.5, 2.0 arrived: 2.0 taken), done at 3.6 (2.5, 3.0, 3.5: 3.5 taken), ...
    got, dropped = _consume(1.2)
    assert got == [0.0, 1.0, 2.0, 3.5, 4.5]
    assert dropped == [0.5, 1.5, 2.5, 3.0, 4.0]
    assert sorted(got + dropped) == [k * 0.5 for k in range(10)]  # each frame either captioned or dropped


def test_stream_cli_realtime_reports_lag_and_drops(exported, tmp_path, capsys):
    from inference.test_stream_cli import _video

    from casa_megatron.inference.cli import main

    video = _video(tmp_path, frames=20)  # 2 s at 10 fps: 4 frames at 2 fps, delivered over 1.5 s
    out = tmp_path / "out"
    assert main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out),
                 "--max-new-tokens", "2", "--decoder", "cpu", "--realtime"]) == 0
    result = json.loads((out / "stream.json").read_text())
    live = result["realtime"]
    assert live["captioned"] + live["dropped"] == 4 and live["captioned"] == len(result["frames"]) >= 1
    assert all(f["lag_s"] > 0 for f in result["frames"]) and live["max_lag_s"] == max(
        f["lag_s"] for f in result["frames"])
    assert result["wall_s"] >= 1.5  # paced: the last frame cannot arrive before 1.5 s
    assert "realtime at 2.0 fps: " in capsys.readouterr().out

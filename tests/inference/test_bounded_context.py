"""``casa-stream --max-context-tokens N``: the restarts reported, the cache under N, a bound that
cannot hold one turn refused (the captioner itself: tests/hf/test_bounded_stream.py)."""

from __future__ import annotations

import json


def test_casa_stream_reports_its_restarts(exported, tmp_path):
    from inference.test_stream_cli import _video

    from casa_megatron.inference.cli import main

    out = tmp_path / "out"
    video = _video(tmp_path, frames=40)  # 4 s at 10 fps: 8 frames at 2 fps
    assert main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(out), "--max-new-tokens",
                 "3", "--decoder", "cpu", "--max-context-tokens", "14"]) == 0
    result = json.loads((out / "stream.json").read_text())
    assert result["restarts"] == sum(f["restarted"] for f in result["frames"]) >= 1
    assert max(f["text_tokens"] for f in result["frames"]) <= 14 and result["max_context_tokens"] == 14
    assert main([str(video), "--model", str(exported[0] / "casa_parallel"), "--out", str(tmp_path / "no"),
                 "--max-context-tokens", "2", "--decoder", "cpu"]) == 2

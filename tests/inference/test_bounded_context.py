"""``LiveCaptioner(max_context_tokens=N)`` / ``casa-stream --max-context-tokens N``: a live stream
that never ends keeps its text cache under N by starting afresh, and what follows a restart is
exactly what a captioner started at that frame says."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _frames(count):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(count)]


def test_the_cache_stays_bounded_and_a_restart_is_a_fresh_start(exported):
    from transformers import AutoModelForCausalLM, AutoProcessor

    from casa_megatron.inference.streaming import ContextTooSmall, LiveCaptioner

    folder = exported[0] / "casa_parallel"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    frames = _frames(10)
    options = dict(max_new_tokens=4, max_pixels=56 * 84)
    free = LiveCaptioner(model, processor, **options)
    unbounded = [free.caption_frame(f, k / 2) for k, f in enumerate(frames)]
    first_turn = len(processor.stream_prompt_ids("") + processor.frame_ids()) + 4 - 1
    later_turn = 1 + len(processor.frame_ids()) + 4 - 1
    limit = first_turn + 2 * later_turn
    assert unbounded[-1].text_tokens > limit  # the bound matters

    bounded = LiveCaptioner(model, processor, max_context_tokens=limit, **options)
    records = [bounded.caption_frame(f, k / 2) for k, f in enumerate(frames)]
    assert [r.index for r in records] == list(range(10))
    assert max(r.text_tokens for r in records) <= limit
    starts = [k for k, r in enumerate(records) if r.restarted]
    assert starts and not records[0].restarted
    for k in range(1, 10):  # restarted exactly when the next turn could have passed the bound
        assert records[k].restarted == (records[k - 1].text_tokens + later_turn > limit)
    for a, b in zip([0, *starts], [*starts, 10]):  # each stretch = a captioner started at its first frame
        fresh = LiveCaptioner(model, processor, **options)
        again = [fresh.caption_frame(f, k / 2) for k, f in zip(range(a, b), frames[a:b])]
        assert [r.tokens for r in again] == [r.tokens for r in records[a:b]]
        assert [r.text_tokens for r in again] == [r.text_tokens for r in records[a:b]]
    assert [r.tokens for r in records[:starts[0]]] == [r.tokens for r in unbounded[:starts[0]]]
    with pytest.raises(ContextTooSmall, match="cannot hold one turn"):
        LiveCaptioner(model, processor, max_context_tokens=first_turn - 1, **options)


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

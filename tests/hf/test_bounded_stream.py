"""``LiveCaptioner(max_context_tokens=N)``: a live stream that never ends keeps its
self-attention cache (text; with token insertion also the inserted image tokens) under N by
starting afresh, and what follows a restart is exactly what a captioner started at that frame says
(CASA and insertion exports from TP=2 checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest


def _frames(count):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("variant", ["casa_parallel", "insertion"])
def test_the_cache_stays_bounded_and_a_restart_is_a_fresh_start(exported, variant):
    from transformers import AutoModelForCausalLM, AutoProcessor

    from casa_megatron.inference.streaming import ContextTooSmall, LiveCaptioner

    folder = exported[0] / variant
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    frames = _frames(10)
    options = dict(max_new_tokens=4, max_pixels=56 * 84)
    free = LiveCaptioner(model, processor, **options)
    unbounded = [free.caption_frame(f, k / 2) for k, f in enumerate(frames)]
    inserted = 6 if variant == "insertion" else 0  # 56x84 px: 4x6 patches, 6 tokens; in the stream if inserted
    first_turn = len(processor.stream_prompt_ids("") + processor.frame_ids()) + inserted + 4 - 1
    later_turn = 1 + len(processor.frame_ids()) + inserted + 4 - 1
    limit = first_turn + 2 * later_turn
    assert unbounded[-1].stream_tokens > limit  # the bound matters
    assert all(r.stream_tokens == r.text_tokens + inserted * (k + 1) for k, r in enumerate(unbounded))

    bounded = LiveCaptioner(model, processor, max_context_tokens=limit, **options)
    records = [bounded.caption_frame(f, k / 2) for k, f in enumerate(frames)]
    assert [r.index for r in records] == list(range(10))
    assert max(r.stream_tokens for r in records) <= limit
    starts = [k for k, r in enumerate(records) if r.restarted]
    assert starts and not records[0].restarted
    for k in range(1, 10):  # restarted exactly when the next turn could have passed the bound
        assert records[k].restarted == (records[k - 1].stream_tokens + later_turn > limit)
    for a, b in zip([0, *starts], [*starts, 10]):  # each stretch = a captioner started at its first frame
        fresh = LiveCaptioner(model, processor, **options)
        again = [fresh.caption_frame(f, k / 2) for k, f in zip(range(a, b), frames[a:b])]
        assert [r.tokens for r in again] == [r.tokens for r in records[a:b]]
        assert [r.stream_tokens for r in again] == [r.stream_tokens for r in records[a:b]]
    assert [r.tokens for r in records[:starts[0]]] == [r.tokens for r in unbounded[:starts[0]]]
    with pytest.raises(ContextTooSmall, match="cannot hold one turn"):
        LiveCaptioner(model, processor, max_context_tokens=first_turn - 1, **options).caption_frame(frames[0], 0.0)

"""The sample layout: placeholders, windows, targets only on answers, captions per frame, truncation."""

from __future__ import annotations

import pytest
import torch

from casa_megatron.data.annotations import Caption, parse_annotation
from casa_megatron.data.interleave import captions_per_frame, fit_to_budget, image_sample, video_sample
from casa_megatron.data.records import SampleError
from casa_megatron.data.tokenization import TextTokenizer

CONVERSATION = {"conversation": [{"question": "what shape is in the image ?", "answer": "red circle"},
                                 {"question": "what colour is the shape ?", "answer": "red"}],
                "type": "coarse"}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return TextTokenizer(tokenizer_dir)


def _targets(sample):
    """Tokens that are trained on, read back from the labels."""
    return [label for label, m in zip(sample.labels, sample.loss_mask) if m]


def test_image_qa_per_turn_layout(tok):
    px = torch.zeros(3, 56, 84, dtype=torch.uint8)
    s = image_sample("k", parse_annotation(CONVERSATION), px, tok, "per_turn")
    s.check()
    sp = tok.special
    ids = s.input_ids
    assert ids[0] == sp.bos
    placeholders = [i for i, t in enumerate(ids) if t == sp.image]
    assert [im.position for im in s.images] == placeholders == s.window_starts  # one window per QA pair
    assert len(s.images) == 2 and s.num_image_tokens == 2 * 6
    # targets: exactly the answer tokens and the <eot> closing each answer
    expected = tok.encode("red circle") + [sp.end_of_turn] + tok.encode("red") + [sp.end_of_turn]
    assert _targets(s) == expected
    for t, (label, m) in enumerate(zip(s.labels, s.loss_mask)):
        if m:
            assert label == ids[t + 1]  # the target at t is the next token
    assert s.cut_points == [placeholders[1], len(ids)]
    assert s.qtype == "coarse"


def test_image_qa_per_sample_keeps_one_window(tok):
    px = torch.zeros(3, 28, 28, dtype=torch.uint8)
    s = image_sample("k", parse_annotation(CONVERSATION), px, tok, "per_sample")
    assert len(s.images) == 1 and s.window_starts == [1]
    assert s.input_ids.count(tok.special.image) == 1


def test_captions_follow_the_frame_at_or_before_them():
    caps = [Caption(0.0, "a"), Caption(0.4, "b"), Caption(1.0, "c"), Caption(1.7, "d"), Caption(9.0, "late")]
    assert captions_per_frame(caps, [0.0, 0.5, 1.0, 1.5], fps=2.0) == [["a", "b"], [], ["c"], ["d"]]


def test_video_window_per_frame(tok):
    ann = parse_annotation({"captions": [{"t": 0.0, "text": "red circle"}, {"t": 1.0, "text": "blue square"}]})
    frames = torch.zeros(3, 3, 28, 56, dtype=torch.uint8)
    s = video_sample("v", ann, frames, [0.0, 0.5, 1.0], 2.0, tok, window_per_frame=True)
    s.check()
    sp = tok.special
    placeholders = [i for i, t in enumerate(s.input_ids) if t == sp.image]
    assert [im.position for im in s.images] == placeholders == s.window_starts
    eot = sp.end_of_turn
    assert _targets(s) == tok.encode("red circle") + [eot, eot] + tok.encode("blue square") + [eot]


def test_video_one_window_per_clip(tok):
    ann = parse_annotation({"captions": [{"t": 0.0, "text": "red"}, {"t": 0.5, "text": "blue"}]})
    frames = torch.zeros(4, 3, 28, 28, dtype=torch.uint8)
    s = video_sample("v", ann, frames, [0.0, 0.5, 1.0, 1.5], 2.0, tok, window_per_frame=False)
    s.check()
    assert [im.position for im in s.images] == [1, 1, 1, 1] and s.window_starts == [1]
    assert s.input_ids[1:5] == [tok.special.image] * 4  # adjacent placeholders, merged into one run
    eot = tok.special.end_of_turn
    assert _targets(s) == tok.encode("red") + [eot] + tok.encode("blue") + [eot]


def test_fit_to_budget_truncates_at_a_turn_boundary(tok):
    px = torch.zeros(3, 56, 84, dtype=torch.uint8)
    s = image_sample("k", parse_annotation(CONVERSATION), px, tok, "per_turn")
    first_turn = s.cut_points[0]
    cut = fit_to_budget(s, max_text=first_turn + 2, max_image_tokens=100)
    assert len(cut) == first_turn and len(cut.images) == 1 and cut.input_ids == s.input_ids[:first_turn]
    cut.check()
    cut = fit_to_budget(s, max_text=1000, max_image_tokens=6)  # image budget binds
    assert len(cut.images) == 1
    with pytest.raises(SampleError, match="too_long"):
        fit_to_budget(s, max_text=3, max_image_tokens=100)
    with pytest.raises(SampleError, match="truncate is off"):
        fit_to_budget(s, max_text=first_turn + 2, max_image_tokens=100, truncate=False)


@pytest.mark.parametrize("obj,match", [
    ({"conversation": [{"question": "q"}]}, "question' and 'answer"),
    ({"captions": [{"t": -1, "text": "x"}]}, "'t' >= 0"),
    ({"other": 1}, "neither"),
])
def test_bad_annotations_are_sample_errors(obj, match):
    with pytest.raises(SampleError, match=match) as info:
        parse_annotation(obj, "key1")
    assert info.value.reason == "bad_annotation"


def test_empty_answer_is_its_own_skip_reason():
    with pytest.raises(SampleError, match="empty answer") as info:
        parse_annotation({"conversation": [{"question": "q", "answer": " "}]}, "key1")
    assert info.value.reason == "empty_turn"


def test_annotation_must_be_json():
    with pytest.raises(SampleError, match="not valid JSON"):
        parse_annotation(b"{oops", "key2")

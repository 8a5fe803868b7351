"""evaluation/items.py reads held-out samples as training does: an image-text pair (a tar
sample's .txt caption) is one question whose answer is the caption."""

from __future__ import annotations

from data.helpers import solid_png, write_shard_dir

from casa_megatron.data.processor import ProcessorSettings
from casa_megatron.evaluation.items import read_items


def test_an_image_text_pair_is_a_question_answered_by_its_caption(tmp_path):
    write_shard_dir(tmp_path / "pairs", {"000000001": {"jpg": solid_png(56, 56), "txt": b"a red square"},
                                         "000000002": {"jpg": solid_png(56, 84), "txt": b"a wide red box"}})
    items = read_items(str(tmp_path / "pairs"), ProcessorSettings("unused: no layout is built", 64, 64))
    assert items.skipped == {}
    assert [(q.key, q.reference, q.answers, q.metric, len(q.media)) for q in items.questions] == [
        ("000000001", "a red square", ["a red square"], "exact", 1),
        ("000000002", "a wide red box", ["a wide red box"], "exact", 1)]

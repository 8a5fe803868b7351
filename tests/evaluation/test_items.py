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


def test_a_share_reads_every_nth_sample_and_keeps_its_index(tmp_path):
    """``part=(k, n)`` (a data-parallel replica's share): the samples k, k + n, ... only, each item
    with its sample's index, so that the shares merge back in order; ``max_samples`` cuts first."""
    import pytest

    samples = {f"{i:09d}": {"jpg": solid_png(56, 56), "txt": f"caption {i}".encode()} for i in range(5)}
    write_shard_dir(tmp_path / "pairs", samples)
    settings = ProcessorSettings("unused: no layout is built", 64, 64)
    whole = read_items(str(tmp_path / "pairs"), settings)
    shares = [read_items(str(tmp_path / "pairs"), settings, part=(k, 2)) for k in range(2)]
    assert [q.order for q in whole.questions] == [0, 1, 2, 3, 4] and whole.part == (0, 1)
    assert [[(q.order, q.reference) for q in s.questions] for s in shares] == [
        [(0, "caption 0"), (2, "caption 2"), (4, "caption 4")], [(1, "caption 1"), (3, "caption 3")]]
    assert [s.part for s in shares] == [(0, 2), (1, 2)]
    cut = read_items(str(tmp_path / "pairs"), settings, max_samples=3, part=(1, 2))
    assert [q.order for q in cut.questions] == [1]
    with pytest.raises(ValueError, match=r"part \(2, 2\): not a share"):
        read_items(str(tmp_path / "pairs"), settings, part=(2, 2))

"""Hugging Face Parquet datasets converted to shards (data/parquet.py, tools/convert_parquet.py):
a two-image conversation in each row layout (The Cauldron, TRL chat messages, LLaVA-OneVision-Data)
gives the same packed batch as the same sample written as a tar shard by hand; images by path,
skipped rows, and bad input are named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data.helpers import solid_png, write_shard_dir
from data.test_formats import MULTI_A, MULTI_Q, _assert_same, _batch, _messages

from casa_megatron.data import shard_index
from casa_megatron.data.parquet import convert, image_extension
from casa_megatron.data.records import ShardError
from casa_megatron.data.sources import open_source

ROOT = Path(__file__).resolve().parents[2]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PART = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])


def _cauldron(images, rows=1):
    texts = [[{"user": MULTI_Q, "assistant": MULTI_A, "source": "multi"}]] * rows
    return pa.table({"images": pa.array([[{"bytes": b, "path": None} for b in images]] * rows, pa.list_(IMAGE)),
                     "texts": texts})


def _trl(images):
    messages = [{"role": "user", "content": [{"index": i, "text": None, "type": "image"} for i in range(len(images))]
                 + [{"index": None, "text": MULTI_Q, "type": "text"}]},
                {"role": "assistant", "content": [{"index": None, "text": MULTI_A, "type": "text"}]}]
    schema = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))
    return pa.table({"messages": pa.array([messages], schema),
                     "images": pa.array([[{"bytes": b, "path": None} for b in images]], pa.list_(IMAGE))})


def _llava_rows(images):
    value = "<image>\n" * len(images) + MULTI_Q
    return pa.table({"id": ["s0"], "images": pa.array([[{"bytes": b, "path": None} for b in images]], pa.list_(IMAGE)),
                     "conversations": [[{"from": "human", "value": value}, {"from": "gpt", "value": MULTI_A}]],
                     "data_source": ["multi"]})


def test_every_row_layout_gives_the_batch_of_the_same_sample_in_a_shard(tmp_path, qwen_tokenizer):
    pngs = [solid_png(60, 90, (200, 0, 0)), solid_png(90, 60, (0, 0, 200))]
    annotation = json.dumps(_messages(["a.png", "b.png"], [(MULTI_Q, MULTI_A)], path=False)).encode()
    reference = write_shard_dir(tmp_path / "by_hand", {"s0": {"0.png": pngs[0], "1.png": pngs[1], "json": annotation}})
    batches = {"by_hand": _batch(reference, qwen_tokenizer, "chat_template")}
    for name, table in (("cauldron", _cauldron(pngs)), ("trl", _trl(pngs)), ("llava", _llava_rows(pngs))):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        report = convert([tmp_path / f"{name}.parquet"], tmp_path / name, progress=False)
        assert (report.rows, report.samples, dict(report.skipped)) == (1, 1, {})
        assert list(report.layouts.values()) == [{"trl": "messages"}.get(name, name)]
        batches[name] = _batch(tmp_path / name, qwen_tokenizer, "chat_template")
    _assert_same(batches)


def test_many_files_images_by_path_and_rows_skipped(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.png").write_bytes(solid_png(56, 56))
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    jpeg = solid_png(56, 56)  # the extension comes from the bytes: a PNG stays a PNG
    pq.write_table(_cauldron([jpeg], rows=5), data / "train-00000-of-00002.parquet", row_group_size=2)
    by_path = _cauldron([b""], rows=3).to_pylist()
    by_path[0]["images"] = [{"bytes": None, "path": "x.png"}]  # read from --media-root
    by_path[1]["images"] = [{"bytes": None, "path": "gone.png"}]  # skipped: missing_media
    by_path[2]["images"] = [{"bytes": solid_png(), "path": None}]
    by_path[2]["texts"] = []  # skipped: bad_annotation
    pq.write_table(pa.Table.from_pylist(by_path, _cauldron([b""]).schema), data / "train-00001-of-00002.parquet")
    report = convert([tmp_path / "hub"], tmp_path / "out", samples_per_shard=4, media_root=tmp_path / "media",
                     progress=False)
    assert (report.files, report.rows, report.samples) == (2, 8, 6)
    assert dict(report.skipped) == {"missing_media": 1, "bad_annotation": 1}
    assert "gone.png" in report.first_skipped[0]
    same_names = tmp_path / "cauldron"  # every subset's files are named alike: the folder keeps keys apart
    for subset in ("ai2d", "chart2text"):
        (same_names / subset).mkdir(parents=True)
        pq.write_table(_cauldron([jpeg]), same_names / subset / "train-00000-of-00001.parquet")
    convert([same_names], tmp_path / "subsets", progress=False)
    both = open_source(tmp_path / "subsets")
    assert [both.key(i) for i in range(2)] == ["ai2d/train-00000-of-00001-000000000",
                                               "chart2text/train-00000-of-00001-000000000"]
    source = open_source(tmp_path / "out")
    assert [source.key(i) for i in range(6)] == [f"train-00000-of-00002-{r:09d}" for r in range(5)] + [
        "train-00001-of-00002-000000000"]
    assert source.read(5).parts["png"] == (tmp_path / "media" / "x.png").read_bytes()
    assert [shard_index.probe(p)["samples"] for p in sorted((tmp_path / "out").glob("*.tar"))] == [4, 2]
    assert image_extension(b"\xff\xd8\xff\xe0") == "jpg" and image_extension(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"


def test_the_tool_names_bad_input(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_parquet", ROOT / "tools/convert_parquet.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pq.write_table(pa.table({"prompt": ["q"], "response": ["a"]}), tmp_path / "sft.parquet")
    assert tool.main([str(tmp_path / "sft.parquet"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "columns ['prompt', 'response'] match no known layout: cauldron needs ['images', 'texts']" in \
        capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert tool.main([str(tmp_path / "bad.parquet"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "bad.parquet: not a readable Parquet file" in capsys.readouterr().err
    pq.write_table(_cauldron([solid_png()]), tmp_path / "ok.parquet")
    assert tool.main([str(tmp_path / "ok.parquet"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "1 file(s) (cauldron), 1 rows: 1 samples written" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "ok.parquet"), str(tmp_path / "out"), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out*"))  # no staging folder left behind
    with pytest.raises(ShardError, match="no row of 1 Parquet file"):
        rows = _cauldron([b""]).to_pylist()
        rows[0]["images"] = [{"bytes": None, "path": None}]
        pq.write_table(pa.Table.from_pylist(rows, _cauldron([b""]).schema), tmp_path / "empty.parquet")
        convert([tmp_path / "empty.parquet"], tmp_path / "none", progress=False)


def test_benchmark_rows_keep_every_answer_and_the_metric(tmp_path):
    """lmms-eval's releases: DocVQA (answers list, question_types list), VQAv2 (answers as
    {answer, answer_confidence, answer_id}, multiple_choice_answer, question_type), ChartQA
    (one answer, type)."""
    from casa_megatron.data.formats import parse_conversation
    from casa_megatron.evaluation.items import _questions

    png = {"bytes": solid_png(), "path": None}
    tables = {
        "docvqa": pa.table({"questionId": ["q1"], "question": ["What is the date?"], "question_types": [["form"]],
                            "image": pa.array([png], IMAGE), "answers": [["1 May", "May 1"]]}),
        "vqav2": pa.table({"question_type": ["how many"], "multiple_choice_answer": ["2"],
                           "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": i}
                                        for i, a in enumerate(["2", "two", "3"])]],
                           "question": ["How many cats?"], "image": pa.array([png], IMAGE)}),
        "chartqa": pa.table({"type": ["human_test"], "question": ["Peak value?"], "answer": ["42"],
                             "image": pa.array([png], IMAGE)}),
    }
    expected = {"docvqa": ("1 May", ["1 May", "May 1"], "anls", "unknown"),
                "vqav2": ("2", ["2", "two", "3"], "vqa", "how many"),
                "chartqa": ("42", ["42"], "relaxed", "human_test")}
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        metric = expected[name][2]
        report = convert([tmp_path / f"{name}.parquet"], tmp_path / name, metric=metric, progress=False)
        assert list(report.layouts.values()) == ["vqa"] and report.samples == 1
        raw = open_source(tmp_path / name).read(0)
        obj = json.loads(raw.parts["json"])
        item, = _questions(raw.key, obj, parse_conversation(obj, raw.key).messages, [])
        assert (item.reference, item.answers, item.metric, item.qtype) == expected[name], name
        assert list(raw.parts) == ["json", "png"] or list(raw.parts) == ["png", "json"]
    with pytest.raises(ValueError, match="metric 'acc' is not one of"):
        convert([tmp_path / "chartqa.parquet"], tmp_path / "x", metric="acc", progress=False)


def test_multiple_choice_rows_list_their_options_and_answer_with_a_letter(tmp_path):
    """AI2D (answer "1": an index as text), ScienceQA (an int index, ``choices``), MMMU (options
    as the string form of a list, answer "C")."""
    from casa_megatron.data.formats import parse_conversation
    from casa_megatron.data.parquet import CHOICE_PROMPT
    from casa_megatron.evaluation.items import _questions

    png = {"bytes": solid_png(), "path": None}
    tables = {
        "ai2d": pa.table({"question": ["Which stage?"], "options": [["egg", "larva", "adult"]], "answer": ["1"],
                          "image": pa.array([png], IMAGE)}),
        "scienceqa": pa.table({"question": ["Which is a mammal?"], "choices": [["frog", "whale"]], "answer": [1],
                               "image": pa.array([png], IMAGE)}),
        "mmmu": pa.table({"question": ["Pick one"], "options": ["['x', 'y', 'z']"], "answer": ["C"],
                          "image": pa.array([png], IMAGE)}),
    }
    expected = {"ai2d": ("B", "Which stage?\nA. egg\nB. larva\nC. adult"),
                "scienceqa": ("B", "Which is a mammal?\nA. frog\nB. whale"),
                "mmmu": ("C", "Pick one\nA. x\nB. y\nC. z")}
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        convert([tmp_path / f"{name}.parquet"], tmp_path / name, progress=False)
        raw = open_source(tmp_path / name).read(0)
        obj = json.loads(raw.parts["json"])
        conv = parse_conversation(obj, raw.key)
        item, = _questions(raw.key, obj, conv.messages, [])
        letter, question = expected[name]
        assert (item.reference, item.answers, item.metric) == (letter, [letter], "choice"), name
        assert conv.messages[0].text() == f"{question}\n{CHOICE_PROMPT}", name
    bad = tables["ai2d"].to_pylist()
    bad[0]["answer"] = "7"
    pq.write_table(pa.Table.from_pylist(bad, tables["ai2d"].schema), tmp_path / "bad.parquet")
    with pytest.raises(ShardError, match="answer '7' names none of the 3 options"):
        convert([tmp_path / "bad.parquet"], tmp_path / "bad", progress=False)


def test_image_caption_rows_become_pairs(tmp_path):
    """Flickr30k / COCO-style rows: an image and a caption (or a list of them)."""
    from casa_megatron.data.formats import parse_conversation, sample_annotation

    png = {"bytes": solid_png(), "path": None}
    table = pa.table({"image": pa.array([png, png, png], IMAGE), "caption": [["a dog", "a brown dog"], ["a cat"], []],
                      "img_id": ["1", "2", "3"]})
    pq.write_table(table, tmp_path / "flickr.parquet")
    report = convert([tmp_path / "flickr.parquet"], tmp_path / "out", progress=False)
    assert (report.layouts[str(tmp_path / "flickr.parquet")], report.samples, dict(report.skipped)) == \
        ("caption", 2, {"empty_turn": 1})
    raw = open_source(tmp_path / "out").read(0)
    conv = parse_conversation(sample_annotation(raw), raw.key)
    assert [m.role for m in conv.messages] == ["user", "assistant"] and conv.messages[1].text() == "a dog"
    assert sample_annotation(raw)["img_id"] == "1"

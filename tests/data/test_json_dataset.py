"""JSON datasets (data/json_dataset.py): a ``.json`` list indexed element by element reads every
sample as ``json.loads`` of the whole file gives it (pretty-printed, non-ASCII, a byte-order mark),
holds a few bytes per sample, and names a file that is not a JSON list."""

from __future__ import annotations

import codecs
import json
import pickle
import tracemalloc

import pytest

from casa_megatron.data.json_dataset import JsonDatasetSource
from casa_megatron.data.records import ShardError


def _sample(i: int, text: str = "What is shown?") -> dict:
    return {"id": f"s{i}", "image": f"img/{i}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": f"answer {i}"}]}


@pytest.mark.parametrize("layout", ["compact", "pretty", "non_ascii", "bom", "spaced"])
def test_every_sample_reads_as_the_whole_file_gives_it(tmp_path, layout):
    samples = [_sample(i, "Qué hay en la foto? 🐱 ünïcödé" if layout in ("non_ascii", "bom") and i % 2 else "Why?")
               for i in range(7)]
    if layout == "pretty":
        text = json.dumps(samples, indent=2)
    elif layout == "non_ascii":
        text = json.dumps(samples, ensure_ascii=False)
    elif layout == "bom":
        text = codecs.BOM_UTF8.decode() + json.dumps(samples, ensure_ascii=False, indent=1)
    elif layout == "spaced":
        text = " \n[\n " + " ,\n\t".join(json.dumps(s) for s in samples) + "\n]\n\n"
    else:
        text = json.dumps(samples, separators=(",", ":"))
    path = tmp_path / "data.json"
    path.write_bytes(text.encode("utf-8"))
    (tmp_path / "img").mkdir()
    for i in range(7):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"png %d" % i)
    source = JsonDatasetSource(path)
    assert len(source) == 7
    for i, sample in enumerate(samples):
        raw = source.read(i)
        assert json.loads(raw.parts["json"]) == sample and raw.key == f"s{i}"
        assert raw.files == {f"img/{i}.png": b"png %d" % i}


def test_a_large_list_holds_and_pickles_a_few_bytes_per_sample(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps([_sample(i) for i in range(20000)]))
    tracemalloc.start()
    source = JsonDatasetSource(path)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held / len(source) < 24  # two int64 offsets per sample (the whole list held: ~1,700)
    assert len(pickle.dumps(source)) / len(source) < 20
    assert source.key(19999) == "s19999"


@pytest.mark.parametrize("text, message", [
    ('{"id": 1}', "must be a non-empty list of samples"),
    ("[]", "must be a non-empty list of samples"),
    ('[{"id": 1, "conversations": []} {"id": 2}]', "expected ',' or ']'"),
    ('[{"id": 1, "conversations": []}] x', "extra data after the list"),
    ('[{"id": 1, "conversations": [', "not a JSON file"),
    (b"[\xff]", "not a JSON file"),
])
def test_a_file_that_is_not_a_json_list_is_named(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ShardError, match=message) as err:
        JsonDatasetSource(path)
    assert str(path) in str(err.value)


def test_the_spans_are_saved_and_a_later_start_parses_nothing(tmp_path, monkeypatch, caplog):
    import logging

    from casa_megatron.data import json_dataset, span_index

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(_sample(i)) + "\n" for i in range(5)))
    first = JsonDatasetSource(path)
    saved = span_index.spans_path(path)
    assert saved == tmp_path / ".casa_index" / "data.jsonl.spans" and saved.is_file()

    def no_scan(p):
        raise AssertionError(f"scanned {p}")

    monkeypatch.setattr(json_dataset, "scan_spans", no_scan)
    again = JsonDatasetSource(path)
    assert [again.key(i) for i in range(5)] == [first.key(i) for i in range(5)] == [f"s{i}" for i in range(5)]
    monkeypatch.undo()
    good = saved.read_bytes()
    for name, damage in (("cut", lambda: saved.write_bytes(good[:-1])), ("magic", lambda: saved.write_bytes(b"x" + good[1:])),
                         ("rewritten", lambda: path.write_text("".join(json.dumps(_sample(i)) + "\n" for i in range(3))))):
        damage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="casa_megatron.data"):
            source = JsonDatasetSource(path)
        assert any("rebuilding the span index" in r.getMessage() for r in caplog.records), name
        assert len(source) == (3 if name == "rewritten" else 5), name
        good = saved.read_bytes()

    def read_only(target, write):
        raise PermissionError(13, "Permission denied", str(target))

    saved.unlink()
    real_write = span_index.atomic_write
    monkeypatch.setattr(span_index, "atomic_write", read_only)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        assert len(JsonDatasetSource(path)) == 3 and not saved.exists()  # computed, nothing saved
    assert any("data.index_dir" in r.getMessage() for r in caplog.records)
    # with data.index_dir, a read-only folder's spans are saved there and read at the next start
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setattr(span_index, "atomic_write", lambda target, write: (
        real_write(target, write) if str(target).startswith(str(cache)) else read_only(target, write)))
    assert len(JsonDatasetSource(path, index_dir=cache)) == 3
    cached, = cache.rglob("*.spans")
    assert cached.name == "data.jsonl.spans" and not saved.exists()
    monkeypatch.setattr(json_dataset, "scan_spans", no_scan)
    assert [JsonDatasetSource(path, index_dir=cache).key(i) for i in range(3)] == [f"s{i}" for i in range(3)]

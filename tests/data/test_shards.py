"""Shard writing/indexing/reading, the manifest, and tools/build_shards.py."""

from __future__ import annotations

import json
import tarfile

import pytest
from data.helpers import qa_json, solid_png, write_shard_dir

from casa_megatron.data.build import build_shards
from casa_megatron.data.records import ShardError
from casa_megatron.data.shards import index_tar, read_sample, split_key
from casa_megatron.data.sources import open_source


def test_split_key_follows_webdataset():
    assert split_key("a/b/x001.seg.png") == ("a/b/x001", "seg.png")
    assert split_key("x001.json") == ("x001", "json")
    assert split_key("README") == ("", "")


def test_write_index_read_round_trip(tmp_path):
    samples = {f"s{i:03d}": {"png": solid_png(colour=(i, 0, 0)), "json": qa_json(answer=str(i))} for i in range(7)}
    write_shard_dir(tmp_path, samples, per_shard=3)
    shards = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    source = open_source(tmp_path)
    assert len(source) == 7 and [source.key(i) for i in range(7)] == sorted(samples)
    for i in (0, 4, 6):
        raw = source.read(i)
        assert raw.parts == samples[raw.key] and raw.source == source.location(i)


def test_shards_are_byte_reproducible(tmp_path):
    samples = {"a": {"png": solid_png(), "json": qa_json()}}
    write_shard_dir(tmp_path / "one", samples)
    write_shard_dir(tmp_path / "two", samples)
    assert (tmp_path / "one/shard-000000.tar").read_bytes() == (tmp_path / "two/shard-000000.tar").read_bytes()


def test_truncated_tar_keeps_its_readable_prefix(tmp_path):
    samples = {f"s{i}": {"png": solid_png(), "json": qa_json()} for i in range(4)}
    write_shard_dir(tmp_path, samples, per_shard=4)
    path = tmp_path / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    index = index_tar(path)
    assert 1 <= len(index) < 4
    assert read_sample(str(path), index[0]).parts["png"] == samples["s0"]["png"]


def test_unreadable_shard_is_named(tmp_path):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError, match="shard-000000.tar: nothing readable"):
        open_source(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no \\*.tar shards"):
        open_source(tmp_path / "empty")


def _loose_files(src):
    src.mkdir()
    for i in range(5):
        (src / f"k{i}.png").write_bytes(solid_png())
        (src / f"k{i}.json").write_bytes(qa_json(answer=f"a{i}"))
    (src / "orphan.png").write_bytes(solid_png())  # no annotation: left out
    (src / "nomedia.json").write_bytes(qa_json())  # no media: left out


def test_build_shards_groups_by_key_and_writes_manifest(tmp_path):
    _loose_files(tmp_path / "src")
    paths = build_shards(tmp_path / "src", tmp_path / "out", 2, manifest=tmp_path / "m.jsonl", progress=False)
    assert len(paths) == 3
    with tarfile.open(paths[0]) as tf:
        assert tf.getnames() == ["k0.json", "k0.png", "k1.json", "k1.png"]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(5)]
    manifest = open_source(tmp_path / "m.jsonl")
    shards = open_source(tmp_path / "out")
    assert manifest.read(3).parts == shards.read(3).parts


def test_rebuild_needs_force_and_leaves_no_stale_or_cut_short_shard(tmp_path, monkeypatch):
    """A loader reads every ``*.tar`` of the folder: a rebuild with fewer shards must not leave the
    earlier build's last shards in it, and an interrupted build must leave no cut-short tar."""
    from casa_megatron.data import build as build_module
    from casa_megatron.runtime.atomic import OutputExists

    _loose_files(tmp_path / "src")
    out = tmp_path / "out"
    assert len(build_shards(tmp_path / "src", out, 1, progress=False)) == 5

    def files(folder):  # the shards and their saved indexes (.casa_index/)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    first = files(out)
    assert len(first) == 10
    with pytest.raises(OutputExists, match=r"out already exists and is not empty .*pass --force"):
        build_shards(tmp_path / "src", out, 2, progress=False)
    assert files(out) == first  # refused: untouched

    class Interrupted(Exception):
        pass

    real = build_module.ShardWriter.write
    calls = []

    def write_then_fail(self, key, parts):  # Ctrl-C after two samples of a forced rebuild
        calls.append(key)
        if len(calls) == 3:
            raise Interrupted()
        real(self, key, parts)

    monkeypatch.setattr(build_module.ShardWriter, "write", write_then_fail)
    with pytest.raises(Interrupted):
        build_shards(tmp_path / "src", out, 2, progress=False, force=True)
    monkeypatch.undo()
    assert files(out) == first  # the old build, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left

    paths = build_shards(tmp_path / "src", out, 2, progress=False, force=True)
    assert sorted(p.name for p in out.glob("*.tar")) == [p.name for p in paths] == \
        ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(files(out)) == sorted([p.name for p in paths] + [f".casa_index/{p.name}.idx" for p in paths])
    assert len(open_source(out)) == 5


def test_build_shards_keeps_several_media_parts_in_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for j in (0, 1, 10):  # 10 sorts after 1 and 2, not between them
        (src / f"m.{j}.png").write_bytes(solid_png(colour=(j, 0, 0)))
    (src / "m.2.jpg").write_bytes(solid_png(colour=(2, 0, 0)))
    (src / "m.json").write_bytes(b'{"conversations": []}')
    build_shards(src, tmp_path / "out", 8, manifest=tmp_path / "m.jsonl", progress=False)
    row, = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert row["media"] == ["src/m.0.png", "src/m.1.png", "src/m.2.jpg", "src/m.10.png"]
    from casa_megatron.data.processor import media_parts

    from_shard = media_parts(open_source(tmp_path / "out").read(0))
    from_manifest = media_parts(open_source(tmp_path / "m.jsonl").read(0))
    assert [data for _, data in from_shard] == [data for _, data in from_manifest] == \
        [(src / f"m.{j}").read_bytes() for j in ("0.png", "1.png", "2.jpg", "10.png")]


def test_build_shards_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_shards_tool", "tools/build_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _loose_files(tmp_path / "src")
    assert tool.main([str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "4"]) == 0
    assert "wrote 2 shard(s)" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2

"""Shard indexes saved beside the shards (data/shard_index.py), the sources that read them
(data/sources.py TarSource), tools/index_shards.py, and the sampler's memory."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data.helpers import qa_json, solid_png, write_shard_dir

from casa_megatron.data import shard_index
from casa_megatron.data.build import build_shards
from casa_megatron.data.records import SampleError
from casa_megatron.data.sampler import RankOrder
from casa_megatron.data.shards import index_tar, scan_tar
from casa_megatron.data.sources import TarSource, open_source

ROOT = Path(__file__).resolve().parents[2]


def _samples(n: int, prefix: str = "s") -> dict:
    """Keys with folders and non-ASCII letters, one to three media parts each."""
    out = {}
    for i in range(n):
        parts = {"json": qa_json(answer=f"a{i}")}
        for k in range(1 + i % 3):
            parts[f"{k}.png" if i % 3 else "png"] = b"png-%d-%d" % (i, k) * (1 + i % 5)
        out[f"dir{i % 2}/{prefix}{i:04d}é"] = parts
    return out


def _tars(folder: Path):
    return sorted(folder.glob("*.tar"))


def test_an_index_holds_exactly_what_the_tar_scan_finds(tmp_path):
    write_shard_dir(tmp_path, _samples(11), per_shard=11)
    shard, = _tars(tmp_path)
    samples, problem = scan_tar(shard)
    index = shard_index.ShardIndex(shard_index.encode(samples, problem, shard_index.TarStamp.of(shard)))
    assert len(index) == 11 and index.problem is None
    assert [index.entry(i) for i in range(11)] == samples  # keys, parts, their order and offsets
    assert [list(index.entry(i).parts) for i in range(11)] == [list(s.parts) for s in samples]


def test_the_first_start_saves_the_indexes_and_the_next_reads_no_tar(tmp_path, monkeypatch):
    samples = _samples(10)
    write_shard_dir(tmp_path, samples, per_shard=4)
    first = open_source(tmp_path)
    assert sorted(p.name for p in (tmp_path / shard_index.INDEX_DIR).iterdir()) == [
        "shard-000000.tar.idx", "shard-000001.tar.idx", "shard-000002.tar.idx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".casa_index", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    def no_scan(path):
        raise AssertionError(f"scanned {path}")

    monkeypatch.setattr(shard_index, "scan_tar", no_scan)
    second = open_source(tmp_path)
    assert len(second) == len(first) == 10
    assert [second.key(i) for i in range(10)] == list(samples)  # write order, across shards
    for i in range(10):
        raw = second.read(i)
        assert raw.parts == samples[raw.key] and raw.source == first.location(i)


def test_a_rewritten_shard_or_a_damaged_index_is_rebuilt_and_said(tmp_path, caplog):
    write_shard_dir(tmp_path, _samples(6), per_shard=6)
    shard, = _tars(tmp_path)
    open_source(tmp_path)
    idx = shard_index.index_path(shard)
    good = idx.read_bytes()
    cases = {
        "cut": (lambda: idx.write_bytes(good[:-3]), "bytes where its header describes"),
        "magic": (lambda: idx.write_bytes(b"X" + good[1:]), "no b'CASAIDX1' magic"),
        "header": (lambda: idx.write_bytes(good[:16] + b"[" + good[17:]), "unreadable header"),
        "empty": (lambda: idx.write_bytes(b""), "no b'CASAIDX1' magic"),
        "rewritten": (lambda: write_shard_dir(tmp_path, _samples(5, "t"), per_shard=6), "it is now size"),
    }
    for name, (damage, said) in cases.items():
        damage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="casa_megatron.data"):
            source = open_source(tmp_path)
        assert any(said in r.getMessage() and "rebuilding the index" in r.getMessage() for r in caplog.records), name
        expected = scan_tar(shard)[0]
        assert [source.key(i) for i in range(len(source))] == [s.key for s in expected], name
        assert shard_index.probe(shard)["samples"] == len(expected), name  # saved again, current


def test_a_damaged_shard_is_named_at_every_start_from_its_index_too(tmp_path, caplog):
    samples = {f"s{i}": {"png": solid_png(colour=(i, 0, 0)), "json": qa_json()} for i in range(4)}
    write_shard_dir(tmp_path, samples, per_shard=4)
    path = tmp_path / "shard-000000.tar"
    png_offset = index_tar(path)[2].parts["png"][0] - 512
    path.write_bytes(path.read_bytes()[:png_offset])  # cut between two members
    for start in ("scanned", "from the saved index"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
            source = open_source(tmp_path)
        assert [source.key(i) for i in range(len(source))] == ["s0", "s1"], start
        message, = [r.getMessage() for r in caplog.records]
        assert "no end-of-archive marker" in message and "first 2 samples" in message, start


def test_where_the_folder_cannot_be_written_the_index_stays_in_memory(tmp_path, monkeypatch, caplog):
    samples = _samples(9)
    write_shard_dir(tmp_path, samples, per_shard=3)

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shard_index, "atomic_write", read_only)
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        source = open_source(tmp_path)
    assert not (tmp_path / shard_index.INDEX_DIR).exists()
    assert any("3 shard index(es) could not be saved" in r.getMessage() for r in caplog.records)
    clone = pickle.loads(pickle.dumps(source))  # a process worker's copy carries them
    for src in (source, clone):
        assert [src.key(i) for i in range(9)] == list(samples)
        assert all(src.read(i).parts == samples[src.key(i)] for i in range(9))


def test_a_source_pickles_and_holds_o_of_shards_not_samples(tmp_path):
    sizes = {}
    for n in (6, 600):
        folder = tmp_path / f"n{n}"
        write_shard_dir(folder, {f"k{i:05d}": {"json": b"{}", "png": b"p"} for i in range(n)}, per_shard=n // 3)
        TarSource(_tars(folder))  # saves the indexes
        tracemalloc.start()
        source = TarSource(_tars(folder))
        keys = [source.key(i) for i in range(n)]  # every shard's index mapped
        held = tracemalloc.get_traced_memory()[0] - sys.getsizeof(keys) - sum(map(sys.getsizeof, keys))
        tracemalloc.stop()
        sizes[n] = (len(pickle.dumps(source)), held)
        assert keys == [f"k{i:05d}" for i in range(n)]
    assert sizes[600][0] - sizes[6][0] < 64, sizes  # the pickle: paths and counts only
    assert sizes[600][1] - sizes[6][1] < 600 * 4, sizes  # held: < 4 bytes per extra sample (before: 678)


def test_few_open_indexes_read_the_same_samples_in_any_order(tmp_path):
    samples = _samples(25)
    write_shard_dir(tmp_path, samples, per_shard=4)
    open_source(tmp_path)
    source = TarSource(_tars(tmp_path), open_indexes=2)
    order = list(range(25)) * 2
    random.Random(0).shuffle(order)
    for i in order:
        raw = source.read(i)
        assert raw.key == list(samples)[i] and raw.parts == samples[raw.key]
        assert len(source._open) <= 2
    with pytest.raises(IndexError):
        source.read(25)


def test_a_shard_rewritten_during_the_run_gives_skipped_samples_not_wrong_ones(tmp_path):
    write_shard_dir(tmp_path, _samples(8), per_shard=4)
    source = TarSource(_tars(tmp_path), open_indexes=1)
    source.read(0)  # shard 0 mapped; shard 1 not yet
    write_shard_dir(tmp_path, _samples(8, "new"), per_shard=4)  # both rewritten in place
    os.utime(_tars(tmp_path)[1], ns=(1, 1))  # whatever the clock's resolution: another stamp
    with pytest.raises(SampleError) as err:
        source.read(5)
    assert err.value.reason == "unreadable_shard" and "shard-000001.tar" in str(err.value)
    assert source.key(5) == "<sample 1 of shard-000001.tar>"  # what a skip message names


def test_build_shards_saves_current_indexes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"k{i}.png").write_bytes(solid_png())
        (src / f"k{i}.json").write_bytes(qa_json(answer=f"a{i}"))
    paths = build_shards(src, tmp_path / "out", 2, progress=False)
    assert [shard_index.probe(p)["samples"] for p in paths] == [2, 2, 1]


def test_index_shards_tool(tmp_path, capsys):
    import importlib.util

    write_shard_dir(tmp_path / "a", _samples(7), per_shard=3)
    write_shard_dir(tmp_path / "b", _samples(2), per_shard=3)
    (tmp_path / "b" / "shard-000009.tar").write_bytes(b"\x00garbage" * 100)
    spec = importlib.util.spec_from_file_location("index_shards", ROOT / "tools/index_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def run(*args):
        code = tool.main(["--no-progress"] + [str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run(tmp_path / "a", tmp_path / "b" / "shard-000000.tar")
    assert code == 0 and "4 shard(s), 9 samples: 4 indexed, 0 already up to date" in out
    assert "3 indexed, 0 already" in run(tmp_path / "a", "--rebuild")[1]
    code, _, err = run(tmp_path / "b")
    assert code == 1 and "shard-000009.tar: nothing readable" in err
    assert run(tmp_path / "nowhere")[0] == 2
    # as a script, in a fresh process
    script = subprocess.run([sys.executable, str(ROOT / "tools/index_shards.py"), "--no-progress", str(tmp_path / "a")],
                            capture_output=True, text=True)
    assert script.returncode == 0 and "3 shard(s), 7 samples: 0 indexed, 3 already up to date" in script.stdout


def test_the_sampler_keeps_its_share_in_int32_in_numpy_s_permutation_order():
    for n, world in ((1, 1), (1000, 3), (12345, 8)):
        for rank in range(world):
            order = RankOrder(n, rank, world, seed=7).epoch_order(2)
            reference = np.random.default_rng([7, 2]).permutation(n)[rank::world]
            assert np.array_equal(order, reference) and order.dtype == np.int32
            assert order.base is None  # not a view holding the whole permutation alive


def _first_start(rank, world, folder, valid, llava, index_dir):
    import torch.distributed as dist

    from casa_megatron.data import span_index
    from casa_megatron.data.config import DataConfig
    from casa_megatron.training import loop

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if index_dir:  # the data folders are read-only
        for module in (shard_index, span_index):
            module.atomic_write = _writes_only_under(index_dir, module.atomic_write)
    scanned = []
    real = shard_index.scan_tar

    def counting(path):
        scanned.append(Path(path).name)
        return real(path)

    shard_index.scan_tar = counting
    from casa_megatron.data import json_dataset

    real_spans = json_dataset.scan_spans

    def counting_spans(path):
        scanned.append(Path(path).name)
        return real_spans(path)

    json_dataset.scan_spans = counting_spans
    cfg = DataConfig(sources=[{"path": str(folder)}, {"path": str(llava)}], valid=[str(valid)],
                     index_dir=str(index_dir or ""))
    loop._index_data_together(cfg)
    during = list(scanned)
    source = TarSource(_tars(folder), index_dir=cfg.index_dir)  # after the barrier: every index saved, nothing scanned
    keys = [source.key(i) for i in range(len(source))]
    json_dataset.JsonDatasetSource(llava, index_dir=cfg.index_dir)
    dist.destroy_process_group()
    return during, scanned[len(during):], keys


@pytest.mark.parametrize("where", ["beside the data", "data.index_dir"])
def test_on_a_first_start_the_ranks_share_the_scan(tmp_path, where):
    from support.dist import run_distributed

    samples = _samples(12)
    write_shard_dir(tmp_path / "train", samples, per_shard=3)  # 4 shards
    write_shard_dir(tmp_path / "valid", _samples(2, "v"), per_shard=2)
    valid, = _tars(tmp_path / "valid")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yes"}]}]))
    index_dir = tmp_path / "cache" if where == "data.index_dir" else None
    results = run_distributed(_first_start, world_size=2, folder=tmp_path / "train", valid=valid, llava=llava,
                              index_dir=index_dir)
    (scan0, after0, keys0), (scan1, after1, keys1) = results
    assert sorted(scan0 + scan1) == sorted([p.name for p in _tars(tmp_path / "train")] + [valid.name, "llava.json"])
    assert not set(scan0) & set(scan1) and len(scan0) == 3 and len(scan1) == 3
    assert after0 == after1 == [] and keys0 == keys1 == list(samples)
    saved = [*tmp_path.rglob("*.idx"), *tmp_path.rglob("*.spans")]
    assert len(saved) == 6 and all((p.is_relative_to(index_dir) if index_dir else shard_index.INDEX_DIR in p.parts)
                                   for p in saved)


def _writes_only_under(folder: Path, real_write):
    """``atomic_write`` as on a read-only data set: only ``folder`` (the index dir) can be written."""
    def write(path, writer):
        if not Path(path).is_relative_to(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, writer)
    return write


def test_a_read_only_data_set_saves_its_indexes_under_data_index_dir(tmp_path, monkeypatch, caplog):
    samples = _samples(9)
    data, cache = tmp_path / "ro" / "data", tmp_path / "cache"
    write_shard_dir(data, samples, per_shard=3)
    monkeypatch.setattr(shard_index, "atomic_write", _writes_only_under(cache, shard_index.atomic_write))
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        first = open_source(data, index_dir=str(cache))
    assert not caplog.records  # nothing kept in memory
    assert not (data / shard_index.INDEX_DIR).exists()
    folder, = cache.iterdir()  # one folder per data folder, named after it
    assert folder.name.startswith("data-") and sorted(p.name for p in folder.iterdir()) == [
        "shard-000000.tar.idx", "shard-000001.tar.idx", "shard-000002.tar.idx"]

    def no_scan(path):
        raise AssertionError(f"scanned {path}")

    with monkeypatch.context() as m:
        m.setattr(shard_index, "scan_tar", no_scan)
        second = open_source(data, index_dir=str(cache))
        worker = pickle.loads(pickle.dumps(second))  # a process worker opens the same saved indexes
        for src in (first, second, worker):
            assert [src.key(i) for i in range(9)] == list(samples)
            assert all(src.read(i).parts == samples[src.key(i)] for i in range(9))
        assert not second._in_memory and not worker._in_memory
    # another data folder of the same name gets its own place
    write_shard_dir(tmp_path / "other" / "data", _samples(2, "o"), per_shard=2)
    assert len(open_source(tmp_path / "other" / "data", index_dir=str(cache))) == 2
    assert len(list(cache.iterdir())) == 2
    # a shard rewritten since: rebuilt, said, saved again under index_dir
    write_shard_dir(data, _samples(4, "t"), per_shard=3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="casa_megatron.data"):
        rewritten = open_source(data, index_dir=str(cache))
    assert any("rebuilding the index" in r.getMessage() and "it is now size" in r.getMessage() for r in caplog.records)
    assert [rewritten.key(i) for i in range(len(rewritten))][:4] == list(_samples(4, "t"))
    assert shard_index.probe(data / "shard-000000.tar", folder / "shard-000000.tar.idx")["samples"] == 3
    # without index_dir, the warning says how to keep them
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        open_source(data)
    assert any("kept in memory" in r.getMessage() and "data.index_dir" in r.getMessage() for r in caplog.records)


def test_an_index_shipped_beside_the_data_is_read_before_index_dir(tmp_path, monkeypatch):
    samples = _samples(6)
    write_shard_dir(tmp_path / "data", samples, per_shard=3)
    shard_index.index_shards(_tars(tmp_path / "data"), progress=False)  # the data set's owner indexed it
    monkeypatch.setattr(shard_index, "scan_tar", lambda path: pytest.fail(f"scanned {path}"))
    source = open_source(tmp_path / "data", index_dir=str(tmp_path / "cache"))
    assert [source.key(i) for i in range(6)] == list(samples)
    assert not (tmp_path / "cache").exists()


def test_index_shards_tool_with_an_index_dir(tmp_path, capsys):
    import importlib.util

    write_shard_dir(tmp_path / "data", _samples(5), per_shard=3)
    spec = importlib.util.spec_from_file_location("index_shards_tool", ROOT / "tools/index_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--no-progress", "--index-dir", str(tmp_path / "cache"), str(tmp_path / "data")]) == 0
    assert "2 shard(s), 5 samples: 2 indexed" in capsys.readouterr().out
    assert not (tmp_path / "data" / shard_index.INDEX_DIR).exists()
    assert len(list((tmp_path / "cache").rglob("*.idx"))) == 2
    # the loader finds them there
    source = TarSource(_tars(tmp_path / "data"), index_dir=str(tmp_path / "cache"))
    assert source._index_files[0].startswith(str(tmp_path / "cache")) and len(source) == 5

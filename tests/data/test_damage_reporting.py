"""Damage is named, once: a tar shard cut at a 512-byte block boundary, and a bad sample that
fails again every epoch (issue 12, item 7)."""

from __future__ import annotations

import logging

from data.helpers import qa_json, solid_png, write_shard_dir

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator
from casa_megatron.data.shards import index_tar


def test_shard_cut_at_a_block_boundary_is_named_and_its_last_sample_dropped(tmp_path, caplog):
    samples = {f"s{i}": {"png": solid_png(colour=(i, 0, 0)), "json": qa_json()} for i in range(4)}
    write_shard_dir(tmp_path, samples, per_shard=4)
    path = tmp_path / "shard-000000.tar"
    whole = index_tar(path)
    data = path.read_bytes()
    # cut right after s2.json's data: a valid-looking tar without s2.png, s3 and the end marker
    png_offset = whole[2].parts["png"][0] - 512  # header of s2.png, a multiple of 512
    path.write_bytes(data[:png_offset])
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data.shards"):
        index = index_tar(path)
    assert [s.key for s in index] == ["s0", "s1"]  # s2 lost its image: not offered as a sample
    message, = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "no end-of-archive marker" in message and "first 2 samples" in message


def test_an_intact_shard_is_not_reported(tmp_path, caplog):
    write_shard_dir(tmp_path, {f"s{i}": {"png": solid_png(), "json": qa_json()} for i in range(3)}, per_shard=3)
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data.shards"):
        assert len(index_tar(tmp_path / "shard-000000.tar")) == 3
    assert not caplog.records


def test_a_bad_sample_is_named_once_and_counted_every_epoch(tmp_path, tokenizer_dir, caplog):
    samples = {f"good{i}": {"png": solid_png(colour=(40 * i, 0, 0)), "json": qa_json()} for i in range(3)}
    samples["broken"] = {"png": b"not a png", "json": qa_json()}
    write_shard_dir(tmp_path / "shards", samples, per_shard=4)
    cfg = DataConfig(source=str(tmp_path / "shards"), tokenizer_path=str(tokenizer_dir), seq_length=128,
                     image_seq_length=256, num_workers=0, pack_buffer=1, shuffle=False, log_interval=0)
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    with caplog.at_level(logging.DEBUG, logger="casa_megatron.data"):
        while it.stats()["samples_seen"] < 3 * len(samples):  # three epochs
            next(it)
    assert it.stats()["skipped_by_reason"] == {"corrupt_image": 3}
    it.close()
    named = [r for r in caplog.records if "'broken'" in r.getMessage()]
    assert [r.levelno for r in named] == [logging.WARNING, logging.DEBUG, logging.DEBUG]

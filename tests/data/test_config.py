"""DataConfig validation: clear errors naming the field, tokenizer found next to the data."""

from __future__ import annotations

import pytest

from casa_megatron.config.errors import ConfigError
from casa_megatron.data.config import DataConfig


def test_synthetic_default_is_valid():
    DataConfig().validate()


def test_tokenizer_is_found_next_to_shards(tiny_dataset):
    cfg = DataConfig(source=str(tiny_dataset["shards"]))
    cfg.validate()
    assert cfg.resolved_tokenizer_path() == tiny_dataset["tokenizer"]


@pytest.mark.parametrize("field,value,match", [
    ("decoder", "gpu", "data.decoder='gpu'"),
    ("worker_type", "fiber", "data.worker_type"),
    ("qa_windows", "never", "data.qa_windows"),
    ("fps", 0.0, "data.fps"),
    ("pixel_budget", 100, "data.pixel_budget"),
    ("pack_buffer", 0, "data.pack_buffer"),
    ("image_std", [0.2, 0.0, 0.2], "data.image_std"),
    ("image_mean", [0.5, 0.5], "data.image_mean"),
])
def test_bad_fields_are_named(tiny_dataset, field, value, match):
    cfg = DataConfig(source=str(tiny_dataset["shards"]), **{field: value})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_missing_source_and_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="no such shard directory"):
        DataConfig(source=str(tmp_path / "nope")).validate()
    (tmp_path / "shards").mkdir()
    with pytest.raises(ConfigError, match="no local tokenizer"):
        DataConfig(source=str(tmp_path / "shards")).validate()

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
    ("index_dir", __file__, "data.index_dir=.* is a file"),
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


def test_blend_and_validation_sources_are_checked(tiny_dataset, tmp_path):
    shards = str(tiny_dataset["shards"])
    ok = DataConfig(sources=[{"path": shards, "weight": 2}, shards], valid=[{"path": shards}])
    ok.validate()
    assert [s.weight for s in ok.source_specs()] == [2.0, 1.0] and not ok.is_synthetic
    assert ok.resolved_tokenizer_path() == tiny_dataset["tokenizer"]
    for sources, valid, match in (
            ([{"path": shards, "weight": 0}], [], r"weight of .* must be a number > 0"),
            ([{"path": shards, "wieght": 2}], [], r"data.sources\[0\]: unknown source keys \['wieght'\]"),
            ([{"weight": 2}], [], r"data.sources\[0\]: each source is"),
            ([shards], [{"path": str(tmp_path / "gone")}], r"data.valid\[0\]=.*gone"),
            ([shards, str(tmp_path / "gone")], [], r"data.sources\[1\]=.*gone")):
        with pytest.raises(ConfigError, match=match):
            DataConfig(sources=sources, valid=valid).validate()
    with pytest.raises(ConfigError, match="text_layout"):
        DataConfig(source=shards, text_layout="html").validate()


def test_eval_interval_needs_validation_sources():
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig

    with pytest.raises(ConfigError, match="eval_interval=5 needs validation sources"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["eval_interval=5"])
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      ["eval_interval=5", "data.valid=[{path: synthetic}]"])
    assert cfg.eval_interval == 5 and cfg.data.valid_specs()[0].path == "synthetic"


def test_a_set_source_wins_over_the_blend(tiny_dataset, tmp_path):
    """``data.source=...`` on the command line switches a blended recipe to one source."""
    shards = str(tiny_dataset["shards"])
    blend = [{"path": str(tmp_path / "not_there"), "weight": 3}]
    one = DataConfig(source=shards, sources=blend)
    one.validate()  # the blend is not used, so its missing path is no error
    assert [s.path for s in one.source_specs()] == [shards] and not one.is_synthetic
    synthetic = DataConfig(source="synthetic", sources=blend, valid=[{"path": shards}])
    synthetic.validate()
    assert synthetic.is_synthetic and DataConfig().is_synthetic  # empty source and sources: synthetic
    assert not DataConfig(sources=[shards]).is_synthetic

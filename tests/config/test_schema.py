"""Config loading (defaults < YAML < overrides) and contradictions named before any work."""

from __future__ import annotations

import pytest

from casa_megatron.config import ConfigError, ModelConfig, ParallelConfig, load_config, save_config


def test_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("lm:\n  num_layers: 6\n  hidden_size: 96\nfusion:\n  every_n: 2\n")
    cfg = load_config(ModelConfig, path, ["lm.hidden_size=128", "fusion.placement=replace"])
    assert cfg.lm.num_layers == 6  # YAML over default
    assert cfg.lm.hidden_size == 128  # override over YAML
    assert cfg.lm.num_attention_heads == ModelConfig().lm.num_attention_heads  # default kept
    assert cfg.fusion.fusion_layers(cfg.lm.num_layers) == [1, 3, 5]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(ModelConfig, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, match", [
    (["fusion.layers=[0, 9]"], r"model.fusion.layers has indices \[9\]"),
    (["fusion.placement=replace", "fusion.share_projections=true"], "replace"),
    (["fusion.layers=[1]", "fusion.every_n=2"], "both set"),
    (["fusion.mechanism=insertion_typo"], "model.fusion.mechanism"),
    (["lm.num_query_groups=3"], "num_query_groups=3"),
    (["vision.trainable_blocks=5"], "trainable_blocks=5"),
    (["lm.no_such_key=1"], "unknown config keys"),
    (["lm.num_layers"], "key=value"),
])
def test_contradictions_name_the_fields(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ModelConfig, None, overrides)


@pytest.mark.parametrize("parallel, match", [
    (ParallelConfig(tensor_model_parallel_size=3), "does not divide model.lm.num_attention_heads"),
    (ParallelConfig(pipeline_model_parallel_size=3), "does not divide model.lm.num_layers"),
    (ParallelConfig(sequence_parallel=True), "sequence_parallel"),
])
def test_parallel_layout_contradictions(parallel, match):
    with pytest.raises(ConfigError, match=match):
        parallel.validate(ModelConfig())

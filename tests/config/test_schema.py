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
    (["lora.rank=4"], r"model.lora.rank=4 adapts a frozen language model: set model.freeze_lm=true"),
    (["lora.rank=4", "freeze_lm=true", "lora.targets=[linear_qkv, lm_head]"], r"model.lora.targets=.*choose one"),
    (["lora.rank=4", "freeze_lm=true", "lora.layers=[0, 12]"], r"model.lora.layers=\[0, 12\]"),
    (["lora.rank=4", "freeze_lm=true", "lora.dropout=1.0"], r"model.lora.dropout=1.0"),
    (["lora.rank=-1"], r"model.lora.rank=-1 must be >= 0"),
    (["lora.rank=4", "freeze_lm=true", "lora.dropout=0.1", "recompute.granularity=full"],
     r"model.lora.dropout=0.1 with model.recompute.granularity=full"),
    (["lora.rank=4", "freeze_lm=true", "fusion.share_projections=true"],
     r"\['linear_proj', 'linear_qkv'\], which model.fusion.share_projections=true"),
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


@pytest.mark.parametrize("overrides, match", [
    (["precision.fp8=hybrid"], "precision.fp8='hybrid' needs a GPU"),
    (["model.vision.encoder=siglip"], "model.vision.encoder='siglip' not in"),
    (["data.temporal_patch_size=2"], "disagrees with model.vision.temporal_patch_size=1"),
    (["model.vision.ffn_hidden_size=97", "parallel.tensor_model_parallel_size=2"],
     "does not divide the vision MLP width 97"),
    (["model.fusion.mechanism=insertion", "model.fusion.image_position_scheme=none"],
     "image_position_scheme='none' has no meaning"),
    (["model.lm.mrope_section=[4,4,4]"], r"mrope_section=\[4, 4, 4\] must be 3 numbers"),
    (["global_batch_size=7"], "global_batch_size=7 is not a multiple of micro_batch_size=2"),
    (["parallel.tensor_model_parallel_size=3"], "does not divide model.lm.num_attention_heads"),
    (["parallel.pipeline_model_parallel_size=3"], "does not divide model.lm.num_layers"),
    (["parallel.num_layers_in_first_pipeline_stage=1"], "needs parallel.pipeline_model_parallel_size > 1"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=0"],
     "num_layers_in_first_pipeline_stage=0: must be >= 1"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_last_pipeline_stage=2"],
     "leaves 0 of model.lm.num_layers=2 for the 1 other stage"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=1",
      "parallel.num_layers_in_last_pipeline_stage=2"], "with both ends given they must add up"),
    (["model.fusion.layers=[5]"], r"model.fusion.layers has indices \[5\]"),
    (["optimizer.decay_style=step"], "optimizer.decay_style"),
    (["parallel.overlap_param_gather=true"], "overlap_param_gather=true needs parallel.overlap_grad_reduce=true"),
    (["parallel.ddp_bucket_size=1000000"], "ddp_bucket_size=1000000 has no effect without"),
    (["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size=0: must be >= 1"),
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
      "optimizer.use_distributed_optimizer=false"],
     "overlap_param_gather=true needs optimizer.use_distributed_optimizer"),
    (["optimizer.warmup_steps=400"], "exceed train_steps"),
], ids=lambda v: v if isinstance(v, str) else v[0])
def test_training_config_contradictions_fail_before_any_work(overrides, match):
    """Every contradiction is reported from the config alone (no process group, no model)."""
    from casa_megatron.config.schema import TrainConfig

    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", overrides)


def test_recipes_load(tmp_path):
    """Every shipped YAML resolves and validates (FP8 recipes need a GPU: checked separately)."""
    from pathlib import Path

    from casa_megatron.config.schema import TrainConfig

    for path in sorted(Path("configs").glob("*.yaml")):
        cfg = load_config(TrainConfig, path, ["precision.bf16=false", "precision.fp8=null", "data.source=synthetic",
                                              "checkpoint.pretrained=null"])  # with one: test_pretrained_config.py
        save_config(cfg, tmp_path / path.name)
        assert load_config(TrainConfig, tmp_path / path.name) == cfg, path

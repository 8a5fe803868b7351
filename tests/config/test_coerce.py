"""Typed config: values coerced by the dataclass field types, ranges from a table, one-line
errors for bad files (issue 12, item 4)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from casa_megatron.config import ConfigError, load_config
from casa_megatron.config.schema import TrainConfig

BASE = "configs/tiny_cpu_synthetic.yaml"


def test_yaml_1_1_floats_and_strings_become_the_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 (no dot) as the *string* '1e-4': the field type says float.
    path.write_text("optimizer: {lr_new: 1e-4, lr_pretrained: 2E-5}\ntrain_steps: 1e3\nrun_dir: 2024\n")
    cfg = load_config(TrainConfig, path, ["optimizer.min_lr_ratio=1e-1", "log_interval=5"])
    assert cfg.optimizer.lr_new == 1e-4 and type(cfg.optimizer.lr_new) is float
    assert cfg.optimizer.lr_pretrained == 2e-5
    assert cfg.optimizer.min_lr_ratio == 0.1
    assert cfg.train_steps == 1000 and type(cfg.train_steps) is int
    assert cfg.run_dir == "2024"


@pytest.mark.parametrize("override, match", [
    ("train_steps=abc", r"train_steps='abc': expected int, got str"),
    ("train_steps=2.5", r"train_steps=2.5: expected int, got float \(not a whole number\)"),
    ("optimizer.lr_new=fast", r"optimizer.lr_new='fast': expected float, got str"),
    ("model.fusion.layers=1", r"model.fusion.layers=1: expected list of int, got int \(write \[1\]"),
    ("model.fusion.layers=[0, x]", r"model.fusion.layers\[1\]='x': expected int, got str"),
    ("tracking.enabled=maybe", r"tracking.enabled='maybe': expected bool"),
    ("micro_batch_size=true", r"micro_batch_size=True: expected int, got bool"),
    ("micro_batch_size=0", r"micro_batch_size=0: must be >= 1 \(int\)"),
    ("log_interval=0", r"log_interval=0: must be >= 1"),
    ("global_batch_size=-4", r"global_batch_size=-4: must be >= 1"),
    ("optimizer.lr_new=0", r"optimizer.lr_new=0.0: must be > 0 \(float\)"),
    ("optimizer.adam_beta2=1", r"optimizer.adam_beta2=1.0: must be >= 0 and < 1"),
    ("data.num_workers=-1", r"data.num_workers=-1: must be >= 0"),
    ("model.vision.ffn_pad_multiple=0", r"model.vision.ffn_pad_multiple=0: must be >= 1 \(int\)"),
    ("model.vision.tokens_per_second=-2", r"model.vision.tokens_per_second=-2.0: must be > 0 \(float\)"),
    ("model.vision.trainable_blocks=-2", r"model.vision.trainable_blocks=-2: must be >= -1"),
    ("model.lm.make_vocab_size_divisible_by=0", r"model.lm.make_vocab_size_divisible_by=0: must be >= 1"),
    ("model.lm.rope_scaling.factor=0", r"model.lm.rope_scaling.factor=0.0: must be > 0"),
    ("checkpoint.verify=md5", r"checkpoint.verify='md5': must be one of"),
    ("model.lm.num_layer=3", r"unknown config keys 'model.lm.num_layer' \(did you mean 'num_layers'\?\)"),
    ("model.lm=3", r"model.lm must be a mapping of fields, got int"),
    ("optimizer.lr_new=[1", r"override optimizer.lr_new='\[1': not a valid YAML value"),
])
def test_wrong_types_and_impossible_values_name_field_value_and_type(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, BASE, [override])


@pytest.mark.parametrize("content, match", [
    (None, r"config file .*missing.yaml does not exist"),
    ("model:\n  lm: {num_layers: 2\n", r"config file .*bad.yaml is not valid YAML: .* at line 3, column 1"),
    ("- a\n- b\n", r"config file .*bad.yaml must hold a mapping of fields, not a list"),
])
def test_missing_or_unparsable_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / ("missing.yaml" if content is None else "bad.yaml")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(TrainConfig, path)
    assert "\n" not in str(info.value)


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    from casa_megatron.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr_new: [}\n")
    for args, expected in (([str(tmp_path / "nope.yaml")], "does not exist"), ([str(bad)], "not valid YAML")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("config error: ") and expected in err
    done = subprocess.run([sys.executable, "-m", "casa_megatron.train", BASE, "train_steps=abc"],
                          capture_output=True, text=True)  # the real entry point: no traceback
    assert done.returncode == 2 and done.stderr == "config error: train_steps='abc': expected int, got str\n"


def test_every_range_and_choice_rule_names_an_existing_numeric_field():
    from casa_megatron.config.limits import choices, rules

    for cls, table in {**rules(), **{c: dict.fromkeys(t) for c, t in choices().items()}}.items():
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for name in table:
            assert name in names, f"{cls.__name__}.{name} does not exist"
            if cls in rules() and name in rules()[cls]:
                base = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
                assert base[0] in (int, float), f"{cls.__name__}.{name} is not numeric"


def test_shipped_configs_are_within_range():
    from pathlib import Path

    from casa_megatron.config.limits import check_limits

    for path in sorted(Path("configs").glob("*.yaml")):
        check_limits(load_config(TrainConfig, path, ["precision.bf16=false", "precision.fp8=null",
                                                     "data.source=synthetic", "checkpoint.pretrained=null"]))

"""The HF config decides the LM architecture; what megatron cannot reproduce is refused with
the field named; bad folders and bad outputs fail before any model is built."""

from __future__ import annotations

import json

import pytest
from support.hf import hf_config

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_config import read_hf_config
from casa_megatron.conversion.importer import import_hf


def _folder(tmp_path, config, name="hf"):
    folder = tmp_path / name
    config.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("family, expected", [
    ("qwen2", dict(add_qkv_bias=True, tie_word_embeddings=True, num_query_groups=2, kv_channels=None,
                   rotary_base=1e6)),
    ("helium", dict(add_qkv_bias=False, tie_word_embeddings=False, norm_epsilon=1e-8)),
    ("llama", dict(kv_channels=24, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    ("qwen2_5_vl", dict(add_qkv_bias=True, tie_word_embeddings=True, mrope_section=[2, 3, 3])),
    ("qwen3", dict(add_qkv_bias=False, qk_layernorm=True, kv_channels=24, tie_word_embeddings=True)),
    ("mistral", dict(add_qkv_bias=False, qk_layernorm=False, kv_channels=None, norm_epsilon=1e-5)),
])
def test_families(tmp_path, family, expected):
    arch = read_hf_config(_folder(tmp_path, hf_config(family)))
    assert arch.lm["family"] == family and arch.lm["vocab_size"] == 99
    assert arch.lm["make_vocab_size_divisible_by"] == 128 and arch.lm["num_layers"] == 4
    for key, value in expected.items():
        assert arch.lm[key] == value, key
    assert arch.vision_kind == ("qwen2_5_vl" if family == "qwen2_5_vl" else None)


@pytest.mark.parametrize("family, change, message", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
    ("helium", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "'sliding_attention'"),
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
])
def test_what_megatron_cannot_reproduce_is_refused(tmp_path, family, change, message):
    folder = _folder(tmp_path, hf_config(family))
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match=message.replace("[", r"\[")):
        read_hf_config(folder)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=r"unsupported architecture model_type='gpt2' \(architectures="
                                              r"\['GPT2LMHeadModel'\]\); supported: \['casa', 'helium', 'llama'"):
        import_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_recipe_disagreeing_with_the_hf_config_names_both(tmp_path):
    folder = _folder(tmp_path, hf_config("qwen2"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  lm: {num_layers: 2, hidden_size: 64}\n  fusion: {every_n: 2}\n")
    with pytest.raises(ConversionError, match=r"model.lm.num_layers: recipe 2 vs .*/hf/config.json 4"):
        import_hf(str(folder), str(tmp_path / "out"), str(recipe))


def test_existing_output_is_refused_without_force(tmp_path):
    folder = _folder(tmp_path, hf_config("qwen2"))
    out = tmp_path / "out"
    (out / "weights").mkdir(parents=True)
    with pytest.raises(ConversionError, match="already exists and is not empty .* pass --force"):
        import_hf(str(folder), str(out))


def test_index_naming_missing_shards_is_refused(tmp_path):
    folder = _folder(tmp_path, hf_config("qwen2"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match=r"names shard files that do not exist: \['model-00001-of-00002"):
        import_hf(str(folder), str(tmp_path / "out"))


def test_vision_from_must_hold_a_vision_encoder_and_be_the_only_one(tmp_path):
    helium, qwen = _folder(tmp_path, hf_config("helium"), "helium"), _folder(tmp_path, hf_config("qwen2_5_vl"), "vl")
    with pytest.raises(ConversionError, match="its config.json has no vision encoder"):
        import_hf(str(helium), str(tmp_path / "out"), vision_from=str(helium))
    with pytest.raises(ConversionError, match="already holds a vision encoder"):
        import_hf(str(qwen), str(tmp_path / "out"), vision_from=str(qwen))


def test_cli_reports_errors_with_status_2(tmp_path, capsys):
    from casa_megatron.conversion.cli import main

    folder = _folder(tmp_path, hf_config("qwen2"))
    assert main(["import-hf", str(folder), str(tmp_path / "out"), "--dtype", "fp8"]) == 2
    assert "casa-convert: error: --dtype 'fp8' not in" in capsys.readouterr().err
    # overrides after the options (the documented form) reach the recipe
    assert main(["import-hf", str(folder), str(tmp_path / "out"), "--dtype", "fp32", "model.lm.num_layers=3"]) == 2
    assert "model.lm.num_layers: recipe 3 vs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import-hf", str(folder), str(tmp_path / "out"), "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    (folder / "config.json").write_text("{not json")
    assert main(["import-hf", str(folder), str(tmp_path / "out")]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err


def test_vision_sources_the_model_cannot_take_are_refused(tmp_path, monkeypatch):
    """Before any tensor is read: a recipe asking for a pretrained encoder that no folder holds,
    a vision kind without a conversion table."""
    from casa_megatron.conversion import tables

    helium, qwen = _folder(tmp_path, hf_config("helium"), "helium"), _folder(tmp_path, hf_config("qwen2_5_vl"), "vl")
    with pytest.raises(ConversionError, match="model.vision.encoder='qwen2_5_vl' expects pretrained vision weights "
                                              "but the checkpoint holds no vision encoder; pass --vision-from"):
        import_hf(str(helium), str(tmp_path / "out"), overrides=["model.vision.encoder=qwen2_5_vl"])
    monkeypatch.delitem(tables.VISION_TABLES, "qwen2_5_vl")
    with pytest.raises(ConversionError, match=r"holds a 'qwen2_5_vl' vision encoder, which has no conversion table "
                                              r"\(registered: \['tiny_vit'\]\); pass --skip-vision"):
        import_hf(str(qwen), str(tmp_path / "out"))


def test_the_qwen2_5_vl_vision_config_is_read(tmp_path):
    arch = read_hf_config(_folder(tmp_path, hf_config("qwen2_5_vl")))
    assert arch.vision["encoder"] == "qwen2_5_vl" and arch.vision_output_size == 64
    assert (arch.vision["num_layers"], arch.vision["hidden_size"], arch.vision["ffn_hidden_size"]) == (2, 32, 48)
    assert arch.vision["fullatt_block_indexes"] == [1] and arch.vision["temporal_patch_size"] == 2

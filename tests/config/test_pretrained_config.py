"""checkpoint.pretrained: the architecture comes from the imported checkpoint; a recipe value
that contradicts it is an error naming both; the paper recipes validate with the real models'
architectures (read from transformers configs with the published sizes, no download)."""

from __future__ import annotations

import pytest
import yaml

from casa_megatron.config import ConfigError, load_config
from casa_megatron.config.pretrained import ARCHITECTURE_FILE, merge_architecture
from casa_megatron.config.schema import TrainConfig

ARCH = {"lm": {"num_layers": 6, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
               "ffn_hidden_size": 48, "vocab_size": 99, "make_vocab_size_divisible_by": 128,
               "init_method_std": 0.1, "rope_scaling": {"type": "llama3", "factor": 8.0}},
        "fusion": {"mechanism": "casa", "placement": "parallel", "share_projections": False,
                   "cross_attention_gate": False, "layers": None, "every_n": 2}}


def _imported(tmp_path, arch=ARCH):
    (tmp_path / ARCHITECTURE_FILE).write_text(yaml.safe_dump({"model": arch}))
    return str(tmp_path)


def test_unset_fields_come_from_the_checkpoint(tmp_path):
    cfg = load_config(TrainConfig, None, [f"checkpoint.pretrained={_imported(tmp_path)}",
                                          "model.lm.init_method_std=0.5", "model.fusion.image_position_scheme=none"])
    assert cfg.model.lm.num_layers == 6 and cfg.model.lm.padded_vocab_size == 128
    assert cfg.model.lm.rope_scaling.type == "llama3" and cfg.model.lm.rope_scaling.factor == 8.0
    assert cfg.model.lm.init_method_std == 0.5  # a soft field: the recipe may change it
    assert cfg.model.fusion.fusion_layers(6) == [1, 3, 5]
    assert cfg.model.fusion.image_position_scheme == "none"  # not architecture: the recipe's


@pytest.mark.parametrize("override, message", [
    ("model.lm.num_layers=4", "model.lm.num_layers: recipe 4 vs checkpoint.pretrained="),
    ("model.lm.rope_scaling.factor=2.0", "model.lm.rope_scaling.factor: recipe 2.0 vs"),
    ("model.fusion.placement=replace", "model.fusion.placement: recipe 'replace' vs"),
    ("model.fusion.every_n=3", "model.fusion layers: recipe [2, 5] vs checkpoint.pretrained="),
])
def test_contradictions_name_both_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TrainConfig, None, [f"checkpoint.pretrained={_imported(tmp_path)}", override])


def test_how_the_encoder_trains_is_the_recipes(tmp_path):
    """Recomputation and LoRA adapters of the encoder shape no weight: a recipe sets them freely,
    also against an architecture.yaml that recorded them (written before they were excluded)."""
    arch = {**ARCH, "vision": {"num_layers": 2, "recompute": {"granularity": "none"}, "lora": {"rank": 0}}}
    cfg = load_config(TrainConfig, None, [f"checkpoint.pretrained={_imported(tmp_path, arch)}",
                                          "model.vision.recompute.granularity=full", "model.vision.lora.rank=2",
                                          "model.vision.trainable_blocks=0"])
    assert cfg.model.vision.recompute.granularity == "full" and cfg.model.vision.lora.rank == 2
    assert cfg.model.vision.num_layers == 2  # from the checkpoint


def test_equal_values_and_equivalent_layer_lists_are_fine():
    explicit = {"model": {"lm": {"num_layers": 6}, "fusion": {"layers": [1, 3, 5]}}}
    merged = merge_architecture(explicit, ARCH, "ckpt")
    assert merged["model"]["fusion"]["every_n"] == 2 and merged["model"]["fusion"]["layers"] is None


def test_missing_or_foreign_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such directory; create it with `casa-convert import-hf"):
        load_config(TrainConfig, None, [f"checkpoint.pretrained={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match="has no architecture.yaml"):
        load_config(TrainConfig, None, [f"checkpoint.pretrained={tmp_path}"])
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face folder: the message names the import
    with pytest.raises(ConfigError, match=f"is a Hugging Face folder .*import it first: `casa-convert import-hf {tmp_path} OUT_DIR"):
        load_config(TrainConfig, None, [f"checkpoint.pretrained={tmp_path}"])


QWEN25VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3,
                          hidden_act="silu")  # Qwen2.5-VL-3B-Instruct's published vision_config


def _paper_import(tmp_path, name, recipe, config, vision_config=None):
    """What import-hf writes into architecture.yaml for a recipe, from config.json(s) alone (the
    importer's own resolution: a recipe contradicting the HF config fails here)."""
    from casa_megatron.config.pretrained import architecture_of
    from casa_megatron.conversion.hf_config import read_hf_config
    from casa_megatron.conversion.importer import check_vision, resolve_config

    folder = tmp_path / name
    config.save_pretrained(str(folder))
    arch = vision_arch = read_hf_config(folder)
    if vision_config is not None:
        vision_config.save_pretrained(str(tmp_path / f"{name}_vision"))
        vision_arch = read_hf_config(tmp_path / f"{name}_vision")
    cfg = resolve_config(recipe, [], arch, vision_arch.vision, str(folder))
    check_vision(cfg, vision_arch, str(tmp_path / f"{name}_vision") if vision_config else None, False)
    (folder / ARCHITECTURE_FILE).write_text(yaml.safe_dump({"model": architecture_of(cfg.model)}))
    return str(folder)


def _assert_qwen25vl_3b_vision(vision):
    assert (vision.encoder, vision.num_layers, vision.hidden_size, vision.num_attention_heads) == \
        ("qwen2_5_vl", 32, 1280, 16)
    assert (vision.ffn_hidden_size, vision.padded_ffn_hidden_size, vision.temporal_patch_size) == (3420, 3424, 2)
    assert (vision.window_size, vision.fullatt_block_indexes) == (112, [7, 15, 23, 31])
    assert vision.trainable_blocks == 4  # the recipe's training choice


def test_paper_recipes_validate_with_the_real_architectures(tmp_path):
    """Both recipes, with the LM and the vision encoder read from transformers configs with the
    published sizes, resolve without contradiction and validate at their TP=2 + SP layout."""
    from transformers import HeliumConfig, Qwen2_5_VLConfig

    qwen = Qwen2_5_VLConfig(  # Qwen2.5-VL-3B-Instruct's published config
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "mrope_section": [16, 24, 24]}),
        vision_config=QWEN25VL_3B_VISION, tie_word_embeddings=True)
    helium = HeliumConfig(vocab_size=64000, num_hidden_layers=28)  # transformers' Helium defaults otherwise
    base = ["precision.bf16=false", "data.source=synthetic"]
    recipe = "configs/qwen25vl3b_casa_frozen_lm.yaml"
    cfg = load_config(TrainConfig, recipe, [*base, f"checkpoint.pretrained={_paper_import(tmp_path, 'qwen', recipe, qwen)}"])
    lm = cfg.model.lm
    assert (lm.family, lm.num_layers, lm.num_query_groups, lm.tie_word_embeddings, lm.add_qkv_bias) == \
        ("qwen2_5_vl", 36, 2, True, True)
    assert lm.mrope_section == [16, 24, 24] and lm.padded_vocab_size == 151936 and cfg.model.freeze_lm
    _assert_qwen25vl_3b_vision(cfg.model.vision)
    assert cfg.model.fusion.resolved_image_position_scheme(cfg.model.vision.encoder) == "mrope"
    recipe = "configs/helium2b_casa_parallel.yaml"
    cfg = load_config(TrainConfig, recipe, [*base, "checkpoint.pretrained=" +
                                            _paper_import(tmp_path, "helium", recipe, helium, qwen)])
    assert (cfg.model.lm.family, cfg.model.lm.norm_epsilon, cfg.model.lm.num_layers) == ("helium", 1e-8, 28)
    _assert_qwen25vl_3b_vision(cfg.model.vision)  # the encoder; the projector maps 5120 -> Helium's 2560
    assert (cfg.model.lm.hidden_size, cfg.model.vision.projector_width(cfg.model.lm.hidden_size)) == (2560, 5120)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel) == (2, True)
    # Qwen3-1.7B's published config: per-head q/k norms, head_dim 128, tied embeddings; the
    # Qwen2.5-VL-3B merger maps to its width (2048)
    from transformers import Qwen3Config

    qwen3 = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                        rms_norm_eps=1e-6, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    recipe = "configs/qwen3_1_7b_casa_parallel.yaml"
    cfg = load_config(TrainConfig, recipe, [*base, "checkpoint.pretrained=" +
                                            _paper_import(tmp_path, "qwen3", recipe, qwen3, qwen)])
    lm = cfg.model.lm
    assert (lm.family, lm.num_layers, lm.num_query_groups, lm.head_dim, lm.qk_layernorm, lm.add_qkv_bias,
            lm.tie_word_embeddings) == ("qwen3", 28, 8, 128, True, False, True)
    _assert_qwen25vl_3b_vision(cfg.model.vision)
    assert cfg.model.vision.projector_width(lm.hidden_size) == 5120 and lm.hidden_size == 2048
    assert cfg.data.chat_template == "configs/chat_templates/qwen3_vl.jinja" and cfg.data.chat_template_text()


def test_a_training_checkpoint_gives_its_run_architecture(tmp_path):
    """A later stage may start from an earlier stage's checkpoint (``latest`` is followed)."""
    from casa_megatron.config import save_config

    earlier = load_config(TrainConfig, None, ["model.lm.num_layers=6", "model.fusion.every_n=3"])
    step = tmp_path / "checkpoints" / "iter_0000010"
    step.mkdir(parents=True)
    save_config(earlier, step / "config.yaml")
    (step / "metadata.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000010")
    cfg = load_config(TrainConfig, None, [f"checkpoint.pretrained={tmp_path / 'checkpoints'}",
                                          "model.vision.trainable_blocks=0"])  # a training choice: free
    assert cfg.model.lm.num_layers == 6 and cfg.model.fusion.fusion_layers(6) == [2, 5]
    with pytest.raises(ConfigError, match="model.lm.num_layers: recipe 4 vs"):
        load_config(TrainConfig, None, [f"checkpoint.pretrained={step}", "model.lm.num_layers=4"])

"""The vision mapping tables: every HF ``visual.*`` tensor is read and every parameter written,
export is import inverted, and the HF vision config fills ``VisionConfig``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.qwen_vision import VisionStack, hf_vision_config, hf_visual_state, hf_vision_model, model_config_for

from casa_megatron.config import ConfigError, VisionConfig
from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf
from casa_megatron.conversion.vision_tables import hf_to_megatron, megatron_to_hf


def test_qwen_table_reads_every_hf_tensor_and_round_trips():
    hf = hf_visual_state(hf_vision_model(intermediate_size=45))
    vision = VisionConfig(**vision_config_from_hf(hf_vision_config(45).to_dict()))
    ours = hf_to_megatron(hf, vision)
    back = megatron_to_hf(ours, vision)
    assert sorted(back) == sorted(hf)  # nothing left unread, nothing invented
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name
    fc1 = ours["vision.blocks.0.mlp.linear_fc1.weight"]
    assert fc1.shape[0] == 2 * vision.padded_ffn_hidden_size == 96  # 45 padded to 48, [gate; up]
    assert fc1[45:48].abs().sum() == 0 and fc1[93:96].abs().sum() == 0


def test_missing_hf_tensor_is_named():
    hf = hf_visual_state(hf_vision_model())
    del hf["visual.blocks.2.attn.qkv.bias"]
    vision = VisionConfig(**vision_config_from_hf(hf_vision_config().to_dict()))
    with pytest.raises(KeyError, match=r"visual\.blocks\.2\.attn\.qkv\.bias"):
        hf_to_megatron(hf, vision)


def _tiny_vit_names(rank, world):
    cfg = dataclasses.replace(model_config_for(hf_vision_config()), vision=VisionConfig(hidden_size=32,
                              num_attention_heads=2, ffn_hidden_size=48))
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    stack = VisionStack(cfg, tp=1)
    ours = {n: p.detach().clone() for n, p in stack.named_parameters()}
    hf = megatron_to_hf(ours, cfg.vision)
    back = hf_to_megatron(hf, cfg.vision)
    return sorted(ours), sorted(back), sorted(hf), all(torch.equal(ours[n], back[n]) for n in ours)


def test_tiny_vit_table_covers_every_parameter():
    ours, back, hf, equal = run_distributed(_tiny_vit_names, world_size=1)[0]
    assert ours == back and equal
    assert "visual.patch_embed.proj.bias" in hf and "visual.final_norm.weight" in hf


def test_vision_config_from_hf():
    hf = hf_vision_config(3420)
    fields = vision_config_from_hf(hf.to_dict())
    v = VisionConfig(**fields)
    v.validate()
    assert (v.encoder, v.num_layers, v.hidden_size, v.num_attention_heads) == \
        ("qwen2_5_vl", hf.depth, hf.hidden_size, hf.num_heads)
    assert (v.ffn_hidden_size, v.padded_ffn_hidden_size) == (3420, 3424)  # splits over TP = 8
    assert (v.temporal_patch_size, v.window_size, v.fullatt_block_indexes) == \
        (hf.temporal_patch_size, hf.window_size, list(hf.fullatt_block_indexes))
    assert v.patch_dim == hf.in_channels * hf.temporal_patch_size * hf.patch_size ** 2
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        vision_config_from_hf({**hf.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="model_type='siglip_vision_model'"):
        vision_config_from_hf({**hf.to_dict(), "model_type": "siglip_vision_model"})

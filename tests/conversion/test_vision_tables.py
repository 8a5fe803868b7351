"""The vision tables in the engine's one format (tables/vision.py): on the real encoder +
projector modules, every parameter is written and every HF ``visual.*`` tensor read, export is
import inverted bit-exactly (the Qwen MLP width padded and sliced back), a missing tensor is
named, and the HF vision config fills ``VisionConfig``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.qwen_vision import VisionStack, hf_vision_config, hf_visual_state, hf_vision_model, model_config_for

from casa_megatron.config import ConfigError, VisionConfig
from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf


def _tables_worker(rank, world):
    from casa_megatron.conversion.engine import Source, export_tensors, load_weights
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.safetensors_io import DictReader
    from casa_megatron.conversion.tables import tables_for
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    out = {}
    # Qwen2.5-VL: HF -> NaN-filled modules -> HF again
    hf = hf_visual_state(hf_vision_model(intermediate_size=45))
    cfg = model_config_for(hf_vision_config(45))
    stack = VisionStack(cfg, tp=1)
    with torch.no_grad():
        for p in stack.parameters():
            p.fill_(float("nan"))
    tables = {c: t for c, t in tables_for(cfg).items() if c != "lm"}  # encoder + projector (= merger)
    report = load_weights(stack, tables, {c: Source(DictReader(hf)) for c in tables}, progress=False)
    back = dict(export_tensors(stack, tables))
    fc1 = dict(stack.named_parameters())["vision.blocks.0.mlp.linear_fc1.weight"]
    out["qwen"] = {"nan": [n for n, p in stack.named_parameters() if torch.isnan(p).any()],
                   "read": sorted(h for names in report.imported.values() for h in names), "hf": sorted(hf),
                   "back": sorted(back), "exact": all(torch.equal(back[n], hf[n]) for n in hf),
                   "fc1_rows": fc1.shape[0], "pad_zero": bool(fc1[45:48].abs().sum() == 0 and fc1[93:96].abs().sum() == 0)}
    del hf["visual.blocks.2.attn.qkv.bias"]
    try:
        load_weights(stack, tables, {c: Source(DictReader(hf)) for c in tables}, progress=False)
    except ConversionError as exc:
        out["missing"] = str(exc)
    # tiny_vit: perturbed modules -> HF -> fresh modules
    tiny = dataclasses.replace(cfg, vision=VisionConfig(hidden_size=32, num_attention_heads=2, ffn_hidden_size=48))
    src, dst = VisionStack(tiny, tp=1), VisionStack(tiny, tp=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.rand(p.shape, generator=g))
    tables = {c: t for c, t in tables_for(tiny).items() if c != "lm"}
    exported = dict(export_tensors(src, tables))
    load_weights(dst, tables, {c: Source(DictReader(exported)) for c in tables}, progress=False)
    out["tiny"] = {"hf": sorted(exported), "exact": all(torch.equal(a, b) for a, b in
                                                       zip(src.parameters(), dst.parameters()))}
    return out


@pytest.fixture(scope="module")
def tables_report():
    return run_distributed(_tables_worker, world_size=1)[0]


def test_qwen_table_reads_every_hf_tensor_and_round_trips(tables_report):
    r = tables_report["qwen"]
    assert r["nan"] == []  # every parameter written
    assert r["read"] == r["hf"] == r["back"]  # every HF tensor read, nothing invented on export
    assert r["exact"]
    assert r["fc1_rows"] == 2 * 48 and r["pad_zero"]  # 45 padded to 48, [gate; up], zero units


def test_missing_hf_tensor_is_named(tables_report):
    assert "missing tensors (1): visual.blocks.2.attn.qkv.bias (for vision.blocks.2.self_attention.linear_qkv.bias)" \
        in tables_report["missing"]


def test_tiny_vit_table_covers_every_parameter(tables_report):
    r = tables_report["tiny"]
    assert r["exact"]
    assert "visual.patch_embed.proj.bias" in r["hf"] and "visual.final_norm.weight" in r["hf"]


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

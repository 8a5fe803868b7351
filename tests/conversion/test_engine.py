"""The engine accounts for every parameter and every HF tensor, inverts exactly, and lists
every bad tensor; run on real megatron models (one gloo process) and tiny HF checkpoints."""

from __future__ import annotations

import pytest
import torch
from support.dist import run_distributed
from support.hf import make_hf_model, save_hf_model

# (family, recipe overrides, --vision-from): CASA initialised from self-attention, CASA
# replacing it (reads self_attn through the fallback rows), gated cross-attention on shared
# projections, a Qwen2.5-VL checkpoint (LM + vision encoder + merger), the same in the new key
# layout, and a Helium LM with the Qwen2.5-VL encoder of another folder.
VARIANTS = {
    "qwen2_casa_every_2": ("qwen2", ["model.fusion.every_n=2"], None),
    "llama_casa_replace": ("llama", ["model.fusion.placement=replace", "model.fusion.every_n=2"], None),
    "helium_gated_shared": ("helium", ["model.fusion.mechanism=cross_attention", "model.fusion.cross_attention_gate=true",
                                       "model.fusion.share_projections=true"], None),
    "qwen2_5_vl_casa": ("qwen2_5_vl", [], None),
    "qwen2_5_vl_new_layout": ("qwen2_5_vl_new_layout", [], None),
    "helium_vision_from_qwen2_5_vl": ("helium", [], "qwen2_5_vl"),
    "helium_vision_from_other_width": ("helium", [], "qwen2_5_vl_merger_32"),  # encoder only, fresh projector
}
QWEN_VISION = ["fusion.every_n=2", "vision.encoder=qwen2_5_vl", "vision.temporal_patch_size=2",
               "vision.ffn_hidden_size=45", "vision.ffn_pad_multiple=8", "vision.fullatt_block_indexes=[1]"]
WITH_VISION = ("qwen2_5_vl_casa", "qwen2_5_vl_new_layout", "helium_vision_from_qwen2_5_vl")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {f: make_hf_model(f, seed=i) for i, f in enumerate(("qwen2", "llama", "helium", "qwen2_5_vl",
                                                                 "qwen2_5_vl_merger_32"))}
    dirs = {f: str(save_hf_model(m, root / f)) for f, m in models.items()}
    # transformers >= 4.52 in-memory layout (model.language_model.*, model.visual.*), one file
    from safetensors.torch import save_file

    new_layout = root / "qwen2_5_vl_new_layout"
    new_layout.mkdir()
    (new_layout / "config.json").write_text((root / "qwen2_5_vl" / "config.json").read_text())
    state = {k: v.clone().contiguous() for k, v in models["qwen2_5_vl"].state_dict().items()}  # lm_head too
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(new_layout / "model.safetensors"))
    dirs["qwen2_5_vl_new_layout"] = str(new_layout)
    return dirs


def _model_and_sources(hf_dir, overrides, vision_from=None):
    """The importer's own steps up to the load: config from config.json (+ the vision folder),
    model, tables and sources."""
    from casa_megatron.config.schema import ParallelConfig
    from casa_megatron.conversion.engine import Source
    from casa_megatron.conversion.hf_config import read_hf_config
    from casa_megatron.conversion.importer import resolve_config, vision_sources
    from casa_megatron.conversion.safetensors_io import SafetensorsReader
    from casa_megatron.conversion.tables import lm_table
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    arch = read_hf_config(hf_dir)
    vision_arch = read_hf_config(vision_from) if vision_from else arch
    cfg = resolve_config(None, ["model.transformer_impl=local", *overrides], arch, vision_arch.vision or None, hf_dir)
    initialize_parallel(1, 1, seed=0)
    model = build_vlm(cfg.model, ParallelConfig(), 4)
    reader = SafetensorsReader(hf_dir)
    vision, vision_tables = vision_sources(cfg, vision_arch, reader, vision_from, False)
    readers = [reader] + ([vision["vision"].reader] if vision_from else [])
    return model, {"lm": lm_table(cfg.model), **vision_tables}, {"lm": Source(reader), **vision}, readers


def _nan_fill_worker(rank, world, hf_dirs):
    from casa_megatron.conversion.engine import load_weights

    out = {}
    for name, (family, overrides, vision_from) in VARIANTS.items():
        model, tables, sources, readers = _model_and_sources(hf_dirs[family], overrides,
                                                             vision_from and hf_dirs[vision_from])
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        report = load_weights(model, tables, sources, progress=False)
        params = dict(model.named_parameters())
        casa_equal_sa = all(
            torch.equal(params[n], params[n.replace("casa_attention", "self_attention").replace("casa_layernorm",
                                                                                                "input_layernorm")])
            for n in report.casa_from_self_attention)
        read = {h for names in report.imported.values() for h in names}
        out[name] = {
            "nan": sorted(n for n, p in params.items() if torch.isnan(p).any()),
            "fresh": sorted(report.fresh), "casa_from_sa": report.casa_from_self_attention,
            "zero": report.zero_initialised, "casa_equal_sa": casa_equal_sa,
            "hf_all": sorted({n for r in readers for n in r.names()}),
            "hf_accounted": sorted(read | set(report.unused) | set(report.not_imported)),
            "not_imported": sorted(set(report.not_imported.values())),
            "gates": [params[n].item() for n in report.zero_initialised],
            "unused": report.unused, "encoder": model.model_config.vision.encoder,
            "visual_read": sum(h.startswith("visual.") for h in read),
            "vision_params": sum(n.startswith(("vision.", "projector.")) for n in params),
            "fresh_why": sorted(set(report.fresh.values())),
        }
    return out


def test_every_parameter_written_and_every_hf_tensor_read(hf_dirs):
    """Fill every parameter with NaN, import: only the components the checkpoint does not hold
    (reported as fresh) stay NaN; every HF tensor is read or listed with a reason; a Qwen2.5-VL
    checkpoint (or --vision-from one) fills the vision encoder and merger too."""
    report, = run_distributed(_nan_fill_worker, world_size=1, hf_dirs=hf_dirs)
    for name, r in report.items():
        assert r["nan"] == r["fresh"], name
        assert r["hf_accounted"] == r["hf_all"], name
        assert r["casa_equal_sa"], name
        if name == "helium_vision_from_other_width":
            continue
        if name in WITH_VISION:
            assert r["fresh"] == [] and r["encoder"] == "qwen2_5_vl", name
            assert r["visual_read"] == 2 * 12 + 1 + 5 and r["vision_params"] == 2 * 10 + 1 + 5, name
        else:
            assert r["fresh"] and all(n.startswith(("vision.", "projector.")) for n in r["fresh"]), name
    assert len(report["qwen2_casa_every_2"]["casa_from_sa"]) == 2 * 4  # layers 1, 3: qkv w+b, proj, norm
    assert report["llama_casa_replace"]["casa_from_sa"] == []  # read from self_attn via the fallback rows
    assert report["helium_gated_shared"]["gates"] == [0.0, 0.0, 0.0, 0.0]
    assert report["qwen2_5_vl_casa"]["not_imported"] == []
    new = report["qwen2_5_vl_new_layout"]  # in-memory layout, with the tied lm_head stored
    assert new["unused"] == {"lm_head.weight": "tied to model.embed_tokens.weight (tie_word_embeddings)"}
    assert sorted(set(new["hf_all"]) - {"lm_head.weight"}) == report["qwen2_5_vl_casa"]["hf_all"]
    assert report["helium_vision_from_qwen2_5_vl"]["not_imported"] == [
        "outside visual.*: only that part of this folder is used"]  # the Qwen2.5-VL folder's LM
    other = report["helium_vision_from_other_width"]  # its merger maps to 32, the LM is 64 wide
    assert other["fresh"] == ["projector.mlp.encoder.linear_fc1.bias", "projector.mlp.encoder.linear_fc1.weight",
                              "projector.mlp.encoder.linear_fc2.bias", "projector.mlp.encoder.linear_fc2.weight",
                              "projector.norm.weight"]
    assert other["visual_read"] == 2 * 12 + 1 and other["encoder"] == "qwen2_5_vl"
    assert other["fresh_why"] == ["the merger of " + hf_dirs["qwen2_5_vl_merger_32"] + " maps to width 32 "
                                  "(vision_config.out_hidden_size), this LM's is 64: projector initialised fresh"]
    assert len(other["not_imported"]) == 2 and other["fresh_why"][0] in other["not_imported"]


def _round_trip_worker(rank, world, fusion):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import ModelConfig, ParallelConfig
    from casa_megatron.conversion.engine import Source, export_tensors, load_weights
    from casa_megatron.conversion.safetensors_io import DictReader
    from casa_megatron.conversion.tables import tables_for
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    cfg = load_config(ModelConfig, None, ["transformer_impl=local", "lm.vocab_size=100", "lm.num_layers=4",
                                          "lm.make_vocab_size_divisible_by=64", *fusion])
    initialize_parallel(1, 1, seed=0)
    g = torch.Generator().manual_seed(3)
    src = build_vlm(cfg, ParallelConfig(), 4)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, p in src.named_parameters():  # padded vocabulary rows / MLP units are zero (never trained)
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                p[cfg.lm.vocab_size:] = 0
            real, padded = cfg.vision.ffn_hidden_size, cfg.vision.padded_ffn_hidden_size
            if name.startswith("vision.") and ".linear_fc1." in name:
                p[real:padded] = 0
                p[padded + real:] = 0
            if name.startswith("vision.") and name.endswith("linear_fc2.weight"):
                p[:, real:] = 0
    tables = tables_for(cfg)
    hf = dict(export_tensors(src, tables))
    dst = build_vlm(cfg, ParallelConfig(), 4)
    with torch.no_grad():
        for p in dst.parameters():
            p.fill_(float("nan"))
    reader = DictReader(hf)
    report = load_weights(dst, tables, {c: Source(reader) for c in tables}, progress=False)
    mismatched = [n for (n, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()) if not torch.equal(a, b)]
    return {"names": sorted(hf), "mismatched": mismatched, "casa_from_sa": report.casa_from_self_attention,
            "embed_rows": hf["model.embed_tokens.weight"].shape[0], "fresh": sorted(report.fresh),
            "shapes": {n: tuple(t.shape) for n, t in hf.items() if n.startswith("visual.")}}


@pytest.mark.parametrize("fusion", [
    ["fusion.every_n=2", "lm.tie_word_embeddings=true", "lm.add_qkv_bias=true"],
    ["fusion.mechanism=cross_attention", "fusion.cross_attention_gate=true", "lm.family=helium"],
    QWEN_VISION,
], ids=["casa_tied", "gated_helium", "qwen2_5_vl_vision"])
def test_export_then_import_is_exact(fusion):
    """The same tables export (to_hf) and import (to_megatron): a perturbed model survives the
    round trip bit-exactly, vision encoder (tiny_vit, or Qwen2.5-VL with its padded MLP width
    sliced back to the HF one) and projector included, in the COMMON hub names."""
    r, = run_distributed(_round_trip_worker, world_size=1, fusion=fusion)
    assert r["mismatched"] == [] and r["casa_from_sa"] == [] and r["fresh"] == []
    assert r["embed_rows"] == 100  # padding (to 128) sliced off on export
    names = set(r["names"])
    assert {"model.layers.1.casa_attn.q_proj.weight", "model.layers.1.casa_layernorm.weight",
            "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight",
            "visual.blocks.1.mlp.gate_proj.bias"} <= names
    if fusion is QWEN_VISION:  # Conv3d kernel, HF MLP width 45 (48 in the model)
        assert r["shapes"]["visual.patch_embed.proj.weight"] == (48, 3, 2, 14, 14)
        assert r["shapes"]["visual.blocks.1.mlp.gate_proj.weight"] == (45, 48)
        assert r["shapes"]["visual.blocks.1.mlp.down_proj.weight"] == (48, 45)
        assert "visual.final_norm.weight" not in names and "visual.patch_embed.proj.bias" not in names
    else:
        assert {"visual.patch_embed.proj.bias", "visual.final_norm.weight"} <= names
    if "lm.tie_word_embeddings=true" in fusion:
        assert "lm_head.weight" not in names and "model.layers.1.self_attn.q_proj.bias" in names
    else:
        assert "lm_head.weight" in names
    assert ("model.layers.3.casa_attn.gate" in names) == ("fusion.cross_attention_gate=true" in fusion)


def _bad_tensors_worker(rank, world, hf_dir):
    from casa_megatron.conversion.engine import Source, load_weights
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.safetensors_io import DictReader

    model, tables, _, (reader,) = _model_and_sources(hf_dir, ["model.fusion.every_n=2"])
    good = {n: reader.get(n) for n in reader.names()}
    edits = {
        "missing": lambda d: d.pop("model.layers.1.mlp.up_proj.weight"),
        "unexpected": lambda d: d.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1),
                                          "visual.blocks.0.norm1.weight": torch.zeros(1)}),
        "shape": lambda d: d.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
        "partial_casa": lambda d: d.update({"model.layers.1.casa_layernorm.weight": torch.ones(64)}),
    }
    messages = {}
    for kind, edit in edits.items():
        tensors = dict(good)
        edit(tensors)
        try:
            load_weights(model, tables, {"lm": Source(DictReader(tensors)), "vision": Source(reason="fresh"),
                                         "projector": Source(reason="fresh")}, progress=False)
            messages[kind] = None
        except ConversionError as exc:
            messages[kind] = str(exc)
    return messages


def test_bad_tensors_are_listed(hf_dirs):
    m, = run_distributed(_bad_tensors_worker, world_size=1, hf_dir=hf_dirs["qwen2"])
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight (for decoder.layers.1.mlp.linear_fc1.weight)" \
        in m["missing"]
    assert "unexpected tensors (2): model.layers.9.mlp.up_proj.weight, visual.blocks.0.norm1.weight" \
        in m["unexpected"]
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (16, 64) vs model (32, 64)" in m["shape"]
    assert "unexpected" not in m["shape"] and "missing" not in m["shape"]  # only the real problem
    assert "missing CASA tensors of a layer whose other CASA tensors are present (3)" in m["partial_casa"]
    assert "model.layers.1.casa_attn.q_proj.weight, model.layers.1.casa_attn.k_proj.weight" in m["partial_casa"]


def _publish_worker(rank, world, hf_dirs, root):
    from pathlib import Path

    from casa_megatron.conversion.importer import import_hf
    from casa_megatron.training import pretrained

    out = Path(root) / "out"
    original = pretrained.save_model_weights

    def dies_half_way(model, directory, release_model=False):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt("killed while saving")

    pretrained.save_model_weights = dies_half_way
    try:
        import_hf(hf_dirs["qwen2"], str(out), progress=False)
    except KeyboardInterrupt:
        pass
    interrupted = sorted(p.name for p in Path(root).iterdir())
    pretrained.save_model_weights = original
    out.mkdir()
    (out / "old_checkpoint_marker").write_text("x")
    result = import_hf(hf_dirs["helium"], str(out), force=True, vision_from=hf_dirs["qwen2_5_vl"], progress=False)
    why = result.report.not_imported
    return {"interrupted": interrupted, "replaced": sorted(p.name for p in Path(root).iterdir()),
            "files": sorted(p.name for p in out.iterdir()),
            "n_visual_not_imported": sum(n.startswith("visual.") for n in why),
            "visual_imported": sum(h.startswith("visual.") for names in result.report.imported.values() for h in names),
            "fresh": len(result.report.fresh), "encoder": result.config.model.vision.encoder,
            "others": sorted({w for n, w in why.items() if not n.startswith("visual.")})}


def test_interrupted_import_leaves_nothing_and_force_replaces(hf_dirs, tmp_path):
    """A save killed half-way leaves neither OUT nor its temporary folder; --force replaces an
    existing OUT only once the new one is complete. Also: Helium LM + --vision-from a
    Qwen2.5-VL folder (its encoder and merger imported, its LM reported as not used)."""
    r, = run_distributed(_publish_worker, world_size=1, hf_dirs=hf_dirs, root=str(tmp_path))
    assert r["interrupted"] == []
    assert r["replaced"] == ["out"]
    assert "old_checkpoint_marker" not in r["files"] and {"weights", "architecture.yaml"} <= set(r["files"])
    assert r["n_visual_not_imported"] == 0 and r["visual_imported"] == 30 and r["fresh"] == 0
    assert r["encoder"] == "qwen2_5_vl"  # the vision architecture comes from the vision folder
    assert r["others"] == ["outside visual.*: only that part of this folder is used"]  # its LM

"""``casa-convert export-hf``: round trips through the real commands, and bad input.

Round trip, per case (one forked gloo process for all, CLI ``main`` for every step):

1. an HF checkpoint saved by transformers -> ``import-hf`` -> ``export-hf`` of the imported folder
   gives back every tensor of the HF checkpoint bit for bit, under the same names (Helium's Q/K
   permutation undone, vocabulary and vision-MLP padding sliced off; the native Qwen2.5-VL
   export holds exactly the HF checkpoint's tensor names);
2. the imported model with every weight perturbed, saved as a training checkpoint ->
   ``export-hf`` -> ``import-hf`` of the export gives back every megatron tensor bit for bit
   (CASA weights, gates, padding included) and the same architecture.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from support.dist import run_distributed

HF_CASES = {  # HF source, import overrides (re-import overrides for the native format), the run's tokenizer
    "helium_casa": ("helium", [], "helium"),
    "llama_cross_attention_gated": ("llama", ["model.fusion.mechanism=cross_attention",
                                              "model.fusion.cross_attention_gate=true", "model.fusion.every_n=2"],
                                    "llama"),
    "qwen2_5_vl_insertion": ("qwen2_5_vl", ["model.fusion.mechanism=insertion"], "qwen2_5_vl"),  # chat template
    "qwen2_5_vl_casa": ("qwen2_5_vl", ["model.fusion.every_n=2"], "generic"),  # trained with layout tokens
    # Qwen3: per-head q/k norms in self-attention and, copied from it, in CASA (placement before)
    "qwen3_casa": ("qwen3", ["model.fusion.placement=before", "model.fusion.every_n=2"], "qwen3"),
}
GENERIC_CASES = {  # our own small model (tiny_vit): fusion, parameter dtype
    "generic_insertion": (dict(mechanism="insertion"), torch.float32),
    "generic_casa_replace": (dict(placement="replace", every_n=2), torch.float32),
    "generic_casa_shared": (dict(share_projections=True, layers=[0, 2]), torch.float32),
    "generic_casa_bf16": (dict(), torch.bfloat16),  # a bf16 run: exported, re-imported and compared in bf16
}
NATIVE = {"qwen2_5_vl_insertion"}


def _cli(*argv) -> tuple:
    from casa_megatron.conversion.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _compare_hf(source: Path, exported: Path) -> dict:
    from casa_megatron.conversion.safetensors_io import SafetensorsReader

    src, out = SafetensorsReader(source), SafetensorsReader(exported)
    differ = [n for n in src.names() if n not in out or not torch.equal(src.get(n), out.get(n))]
    return {"compared": len(src.names()), "differ": differ, "extra": sorted(set(out.names()) - set(src.names()))}


def _architecture(model_cfg) -> dict:
    """The architecture fields, fusion layers compared as the resolved list."""
    from casa_megatron.config.pretrained import architecture_of

    arch = architecture_of(model_cfg)
    arch["fusion"].update(layers=model_cfg.fusion.fusion_layers(model_cfg.lm.num_layers), every_n=None)
    return arch


def _round_trip(name: str, root: Path, model_cfg, model, tokenizer: Path, reimport: list) -> dict:
    """Perturb, save a training checkpoint, export, import the export, compare."""
    from casa_megatron.config.loader import load_config_dict, read_yaml
    from casa_megatron.config.schema import ModelConfig, TrainConfig
    from casa_megatron.data.config import DataConfig
    from support.export import load_weights, perturb, save_weights_checkpoint

    perturb(model, model_cfg)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(model=model_cfg, data=DataConfig(tokenizer_path=str(tokenizer)))
    save_weights_checkpoint(model, cfg, root / "run")
    code, err = _cli("export-hf", root / "run", root / "hf", "--no-progress")  # a run directory
    assert code == 0, err
    code, err = _cli("import-hf", root / "hf", root / "reimported", *reimport, "--no-progress")
    assert code == 0, err
    got = load_weights(root / "reimported")
    again = load_config_dict(ModelConfig, read_yaml(root / "reimported" / "model.yaml"))
    return {"names_equal": sorted(got) == sorted(expected),
            "differ": [n for n in expected if n in got and not torch.equal(got[n], expected[n])],
            "params": len(expected), "gates": [float(v) for n, v in expected.items() if n.endswith("casa_gate")],
            "architecture_equal": _architecture(again) == _architecture(model_cfg),
            "format": json.loads((root / "hf" / "config.json").read_text()).get("model_type"),
            "architectures": json.loads((root / "hf" / "config.json").read_text()).get("architectures")}


def _qwen_case(kind: str):
    """The HF test cases (our layout tokens: ``<image>`` = 4 stays in the stream) with Qwen2.5-VL
    patches (a still frame repeated: C*2*14*14 values)."""
    from support.hf_cases import make_case

    case = make_case(kind)
    g = torch.Generator().manual_seed(3)
    case["pixel_patches"] = torch.randn(case["pixel_patches"].shape[0], 3 * 2 * 14 * 14, generator=g)
    return case


def _tiny_vit_case(kind: str):
    from support.hf_cases import make_case

    return make_case(kind)


def _megatron_logits(model, case):
    from support.hf_cases import megatron_batch

    with torch.no_grad():
        return model.eval()(megatron_batch(case)).transpose(0, 1).contiguous()  # [b, s, v]


# HF cases whose export is compared with megatron through the remote code: their inputs
REMOTE_CODE_LOGITS = {"qwen2_5_vl_casa": _qwen_case, "qwen3_casa": _tiny_vit_case}


def _worker(rank, world, root, hf_dirs, tokenizers):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.config.loader import load_config_dict, read_yaml
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import load_model_weights
    from support.export import export_megatron
    from support.vlm import small_model_config

    root, report = Path(root), {}
    for name, (source, overrides, tokenizer) in HF_CASES.items():
        base = root / name
        code, err = _cli("import-hf", hf_dirs[source], base / "imported", *overrides, "model.transformer_impl=local",
                         "--no-progress")
        assert code == 0, err
        code, err = _cli("export-hf", base / "imported", base / "hf_from_import", "--no-progress")
        assert code == 0, err
        model_cfg = load_config_dict(ModelConfig, read_yaml(base / "imported" / "model.yaml"))
        initialize_parallel(1, 1, seed=0)
        model = build_vlm(model_cfg, ParallelConfig(), 16)
        load_model_weights(model, base / "imported")
        reimport = overrides[:1] if name in NATIVE else []
        report[name] = {"hf": _compare_hf(Path(hf_dirs[source]), base / "hf_from_import"),
                        **_round_trip(name, base, model_cfg, model, Path(tokenizers[tokenizer]), reimport)}
        if name in REMOTE_CODE_LOGITS:  # the exported (perturbed) model's logits, for the remote code
            report[name]["logits"] = {kind: _megatron_logits(model, REMOTE_CODE_LOGITS[name](kind))
                                      [..., :model_cfg.lm.vocab_size] for kind in ("image", "video")}
    for name, (fusion, dtype) in GENERIC_CASES.items():
        model_cfg = small_model_config(**fusion)
        initialize_parallel(1, 1, seed=0)
        model = build_vlm(model_cfg, ParallelConfig(), 16, dtype)
        report[name] = _round_trip(name, root / name, model_cfg, model, Path(tokenizers["generic"]), [])
        report[name]["dtype"] = json.loads((root / name / "hf" / "config.json").read_text())["dtype"]
    # the in-process helper other tests use writes the same tensors as the command
    export_megatron(model, model_cfg, root / "in_process", Path(tokenizers["generic"]))
    report["in_process"] = _compare_hf(root / name / "hf", root / "in_process")
    # a bf16 run exported as fp32: the same values, cast
    from casa_megatron.conversion.safetensors_io import SafetensorsReader

    code, err = _cli("export-hf", root / "generic_casa_bf16" / "run", root / "as_fp32", "--dtype", "fp32",
                     "--no-progress")
    assert code == 0, err
    bf16, fp32 = SafetensorsReader(root / "generic_casa_bf16" / "hf"), SafetensorsReader(root / "as_fp32")
    report["as_fp32"] = {"names": bf16.names() == fp32.names(),
                         "dtype": json.loads((root / "as_fp32" / "config.json").read_text())["dtype"],
                         "differ": [n for n in bf16.names() if fp32.get(n).dtype != torch.float32
                                    or not torch.equal(fp32.get(n), bf16.get(n).float())]}
    # small shards: several files and an index, the same tensors
    shared = root / "generic_casa_shared"
    code, err = _cli("export-hf", shared / "run", root / "sharded", "--max-shard-size", "60KB", "--no-progress")
    assert code == 0, err
    report["sharded"] = {**_compare_hf(shared / "hf", root / "sharded"),
                         "files": sorted(p.name for p in (root / "sharded").glob("*.safetensors*"))}
    return report


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    from support.export import chat_tokenizer
    from support.hf import make_hf_model, save_hf_model
    from support.hf_fixture import tiny_tokenizer
    from support.qwen_vl import hf_qwen_vl
    from support.vlm import VOCAB

    root = tmp_path_factory.mktemp("export")
    dirs = {f: save_hf_model(make_hf_model(f, seed=i), root / "src" / f)
            for i, f in enumerate(("helium", "llama", "qwen3"))}
    dirs["qwen2_5_vl"] = root / "src" / "qwen2_5_vl"
    hf_qwen_vl().save_pretrained(str(dirs["qwen2_5_vl"]))
    tokenizers = {"helium": tiny_tokenizer(dirs["helium"], 99), "llama": tiny_tokenizer(dirs["llama"], 99),
                  "qwen3": tiny_tokenizer(dirs["qwen3"], 99),
                  "qwen2_5_vl": chat_tokenizer(dirs["qwen2_5_vl"]), "generic": tiny_tokenizer(root / "tok", VOCAB)}
    report, = run_distributed(_worker, world_size=1, root=str(root), hf_dirs={k: str(v) for k, v in dirs.items()},
                              tokenizers={k: str(v) for k, v in tokenizers.items()})
    return root, report


@pytest.mark.parametrize("case", list(HF_CASES))
def test_export_of_an_import_gives_back_the_hf_checkpoint(round_trips, case):
    hf = round_trips[1][case]["hf"]
    assert hf["compared"] > 20 and hf["differ"] == [], hf["differ"]
    if case in NATIVE:  # transformers' own Qwen2.5-VL: exactly its tensors
        assert hf["extra"] == []
    else:  # our CASA layers (casa_attn / casa_layernorm / gate) and, without a vision source, the tiny ViT
        assert hf["extra"] and all(".casa_" in n or n.startswith("visual.") for n in hf["extra"]), hf["extra"]


@pytest.mark.parametrize("case", [*HF_CASES, *GENERIC_CASES])
def test_export_then_import_gives_back_every_tensor(round_trips, case):
    r = round_trips[1][case]
    assert r["names_equal"] and r["differ"] == [] and r["params"] > 20, r
    assert r["architecture_equal"]
    if case in NATIVE:
        assert r["format"] == "qwen2_5_vl" and r["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    else:
        assert r["format"] == "casa"
    if "gated" in case:
        assert r["gates"] and all(g != 0 for g in r["gates"])
    if case in GENERIC_CASES:
        assert r["dtype"] == str(GENERIC_CASES[case][1]).replace("torch.", "")


def test_in_process_export_helper_equals_the_command(round_trips):
    r = round_trips[1]["in_process"]
    assert r["compared"] > 20 and r["differ"] == [] and r["extra"] == []


def test_dtype_option_casts_a_bf16_checkpoint(round_trips):
    assert round_trips[1]["as_fp32"] == {"names": True, "dtype": "float32", "differ": []}


def test_sharded_export_has_an_index_and_loads_the_same(round_trips):
    from transformers import AutoModelForCausalLM

    from support.hf_cases import hf_inputs, make_case

    root, report = round_trips
    r = report["sharded"]
    assert r["differ"] == [] and r["extra"] == [] and r["compared"] > 20
    shards = [f for f in r["files"] if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in r["files"]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    inputs = hf_inputs(make_case("image"))
    logits = []
    for folder in (root / "generic_casa_shared" / "hf", root / "sharded"):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(model(**inputs, use_cache=False).logits)
    assert torch.equal(*logits)


def test_casa_with_the_qwen_encoder_equals_megatron_through_the_remote_code(round_trips):
    """CASA on a Qwen2.5-VL backbone (its encoder, mrope image keys): the exported folder, loaded
    with the remote code (transformers' own vision tower inside), gives the megatron logits."""
    from transformers import AutoModelForCausalLM

    from support.hf_cases import hf_inputs

    root, report = round_trips
    folder = root / "qwen2_5_vl_casa" / "hf"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.config.vision_config["encoder"] == "qwen2_5_vl" and model.config.image_position_scheme == "mrope"
    processor = json.loads((folder / "processor_config.json").read_text())  # trained with our layout tokens
    assert processor["text_layout"] == "layout_tokens" and model.config.placeholders_in_stream
    assert model.config.image_token_id == 4
    for kind in ("image", "video"):
        with torch.no_grad():
            out = model(**hf_inputs(_qwen_case(kind)), use_cache=False).logits
        ref = torch.as_tensor(report["qwen2_5_vl_casa"]["logits"][kind])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kind}: {m}")


def test_casa_on_a_qwen3_backbone_equals_megatron_through_the_remote_code(round_trips):
    """Qwen3's per-head q/k norms: self-attention's under the hub names, CASA's own (copied from
    them at import, then trained apart: perturbed here) under ``casa_attn.q_norm`` / ``k_norm``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from support.hf_cases import hf_inputs

    root, report = round_trips
    folder = root / "qwen3_casa" / "hf"
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    for i, fused in ((0, False), (1, True), (2, False), (3, True)):  # every_n=2: layers 1 and 3
        assert {f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight"} <= names
        assert (f"model.layers.{i}.casa_attn.k_norm.weight" in names) == fused
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.config.lm_family == "qwen3" and model.config.qk_layernorm
    for kind in ("image", "video"):
        with torch.no_grad():
            out = model(**hf_inputs(_tiny_vit_case(kind)), use_cache=False).logits
        ref = torch.as_tensor(report["qwen3_casa"]["logits"][kind])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kind}: {m}")


def test_native_export_loads_in_transformers_without_remote_code(round_trips):
    from transformers import AutoConfig, AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    folder = round_trips[0] / "qwen2_5_vl_insertion" / "hf"
    assert not list(folder.glob("*.py"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).model_type == "qwen2_5_vl"
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__.startswith("Qwen2VLImageProcessor")
    image_pad = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]["<|image_pad|>"]
    assert model.config.image_token_id == image_pad


# --- bad input ----------------------------------------------------------------------------------
def _bad_inputs(rank, world, root):
    from casa_megatron.training.ckpt_manifest import write_manifest

    root = Path(root)
    run = root / "generic_casa_replace" / "run"
    ckpt = run / "checkpoints" / "iter_0000001"
    cases = {}
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("x")
    cases["not_a_checkpoint"] = _cli("export-hf", root / "notes", root / "o1")
    cases["no_such_dir"] = _cli("export-hf", root / "nothing", root / "o1")
    for name, damage in (("no_manifest", lambda d: (d / "manifest.json").unlink()),
                         ("truncated", lambda d: _truncate(sorted(d.glob("*.distcp"))[0]))):
        copy = root / name / "iter_0000001"
        shutil.copytree(ckpt, copy)
        damage(copy)
        cases[name] = _cli("export-hf", copy, root / "o1")
    edited = root / "edited" / "iter_0000001"  # config.yaml says gated cross-attention: no gates stored
    shutil.copytree(root / "generic_casa_shared" / "run" / "checkpoints" / "iter_0000001", edited)
    text = (edited / "config.yaml").read_text().replace("mechanism: casa", "mechanism: cross_attention")
    (edited / "config.yaml").write_text(text.replace("cross_attention_gate: false", "cross_attention_gate: true"))
    write_manifest(edited, 1)
    cases["missing_tensors"] = _cli("export-hf", edited, root / "o1", "--no-progress")
    moved = root / "moved" / "iter_0000001"  # the run's tokenizer is not on this machine
    shutil.copytree(ckpt, moved)
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(config.replace(str(root / "tok"), "/elsewhere/tokenizer"))
    write_manifest(moved, 1)
    cases["no_tokenizer"] = _cli("export-hf", moved, root / "o1")
    (root / "dangling").mkdir()
    (root / "dangling" / "latest").write_text("iter_0000009")
    cases["dangling_latest"] = _cli("export-hf", root / "dangling", root / "o1")
    cases["native_for_casa"] = _cli("export-hf", ckpt, root / "o1", "--format", "qwen2_5_vl")
    generic_tok = root / "tok"
    cases["native_tokenizer"] = _cli("export-hf", root / "qwen2_5_vl_insertion" / "run", root / "o1",
                                     "--tokenizer", generic_tok, "--no-progress")
    cases["tokenizer_too_large"] = _cli("export-hf", root / "helium_casa" / "run", root / "o1", "--tokenizer",
                                        root / "src" / "qwen2_5_vl", "--no-progress")
    cases["bad_shard_size"] = _cli("export-hf", ckpt, root / "o1", "--max-shard-size", "2 gigs")
    cases["bad_tokenizer_dir"] = _cli("export-hf", ckpt, root / "o1", "--tokenizer", root / "notes")
    interrupted = root / "interrupted_import"
    shutil.copytree(root / "helium_casa" / "imported", interrupted)
    shutil.rmtree(interrupted / "weights")
    cases["interrupted_import"] = _cli("export-hf", interrupted, root / "o1")
    (root / "taken").mkdir()
    (root / "taken" / "old.txt").write_text("keep")
    cases["exists"] = _cli("export-hf", ckpt, root / "taken", "--no-progress")
    kept = (root / "taken" / "old.txt").exists()
    cases["forced"] = _cli("export-hf", ckpt, root / "taken", "--force", "--no-progress")
    cases["forced"] += ((root / "taken" / "old.txt").exists(), (root / "taken" / "config.json").exists(), kept,
                        sorted(p.name for p in root.iterdir() if p.name.startswith(".taken")))
    return cases


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "not_a_checkpoint": r"notes is not a checkpoint \(it holds \['readme.txt'\]\); expected a training checkpoint "
                        r"\(iter_N/ with config.yaml, metadata.json and manifest.json",
    "no_such_dir": r"nothing: no such directory; expected a training checkpoint",
    "no_manifest": r"incomplete or damaged checkpoint: .*iter_0000001 has no manifest.json \(save never finished\)",
    "truncated": r"incomplete or damaged checkpoint: .*\.distcp has \d+ bytes, the manifest says \d+ \(truncated",
    "missing_tensors": r"does not hold the model its config.yaml describes:\n  missing tensors \(2\): "
                       r"decoder.layers.0.casa_gate, decoder.layers.2.casa_gate",
    "no_tokenizer": r"no tokenizer found for .*moved/iter_0000001 \(looked in: /elsewhere/tokenizer\); pass --tokenizer DIR",
    "dangling_latest": r"dangling/latest names iter_0000009, which does not exist; pass an iter_N/ folder",
    "native_for_casa": r"no equivalent in transformers' Qwen2_5_VLForConditionalGeneration:\n  "
                       r"model.fusion.mechanism='casa': .*\n  model.vision.encoder='tiny_vit'.*\n  "
                       r"model.fusion.image_position_scheme='insertion'",
    "native_tokenizer": r"has no \['<\|image_pad\|>', '<\|video_pad\|>', '<\|vision_start\|>', '<\|vision_end\|>'\]",
    "tokenizer_too_large": r"has 113 tokens but the model's vocabulary is model.lm.vocab_size=99",
    "bad_shard_size": r"max shard size '2 gigs': expected a number of bytes or e.g. '2GB'",
    "bad_tokenizer_dir": r"--tokenizer .*notes: no tokenizer_config.json there",
    "interrupted_import": r"looks like a `casa-convert import-hf` folder but lacks \['metadata.json'\]",
    "exists": r"output .*taken already exists and is not empty .*; pass --force to replace it",
}


@pytest.fixture(scope="module")
def bad_inputs(round_trips):
    return run_distributed(_bad_inputs, world_size=1, root=str(round_trips[0]))[0]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_with_a_clear_message(bad_inputs, case):
    import re

    code, err = bad_inputs[case][:2]
    assert code == 2, err
    message = err[err.index("casa-convert: error: "):]  # after the timed phase lines, if any
    assert re.search(BAD[case], message), err


def test_force_replaces_an_existing_output_only_when_complete(bad_inputs):
    code, err, old_left, new_written, kept_before, hidden = bad_inputs["forced"]
    assert code == 0, err
    assert (old_left, new_written, kept_before) == (False, True, True)
    assert hidden == []  # no temporary or old folder left behind

"""``casa-convert export-hf --lora separate``: the base weights plus a PEFT adapter folder.

The LoRA training checkpoints of the ``exported`` fixture (trained at TP=2 and PP=2: adapters on
every LM linear and on the frozen encoder's blocks; or on the MLP of two LM layers of the
insertion model; or DoRA on the attention of two layers of a Helium-family LM, whose Q/K rows the
export permutes) are exported again with ``--lora separate``. transformers loads the base folder,
PEFT (``PeftModel.from_pretrained``) puts the adapters on its ``q_proj`` / ``k_proj`` / ``v_proj`` /
``gate_proj`` / ``up_proj`` / ... modules, and the result gives megatron's logits; the base alone
does not. The CASA variant's LM adapters are rsLoRA (``alpha / sqrt(rank)``), its encoder's plain
LoRA: PEFT computes both scales itself from the exported config; the Helium variant's DoRA
magnitudes (``lora_magnitude_vector``) follow the permuted rows. Bad input: no adapters in the
checkpoint. The native Qwen2.5-VL format's adapter is tested with its export
(tests/model/test_insertion_qwen.py).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from support.dist import run_distributed
from support.hf_cases import hf_inputs, make_case

TOL = dict(rtol=1e-4, atol=1e-4)
CASES = [("casa_lora", "tp2"), ("casa_lora", "pp2_encoder_split"), ("insertion_lora_mlp", "pp2"),
         ("casa_helium_dora_attention", "tp2")]


def _export(rank, world, jobs):
    from casa_megatron.conversion.cli import main

    out = []
    for argv in jobs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out.append((main(argv), err.getvalue()))
    return out


@pytest.fixture(scope="module")
def separate(exported, tmp_path_factory):
    root, logits = exported
    out = tmp_path_factory.mktemp("peft")
    jobs = [["export-hf", str(root / layout / name / "checkpoints"), str(out / f"{name}-{layout}"), "--no-progress",
             "--lora", "separate"] for name, layout in CASES]
    jobs.append(["export-hf", str(root / "tp2" / "casa_parallel" / "checkpoints"), str(out / "none"), "--no-progress",
                 "--lora", "separate"])
    results, = run_distributed(_export, world_size=1, jobs=jobs)
    return out, logits, results


@pytest.mark.parametrize("name, layout", CASES)
def test_base_plus_peft_adapter_equals_megatron(separate, name, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, logits, results = separate
    code, err = results[CASES.index((name, layout))]
    assert code == 0, err
    folder = out / f"{name}-{layout}"
    config = json.loads((folder / "lora_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(folder.resolve())
    base = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = {kind: hf_inputs(make_case(kind)) for kind in ("image", "video")}
    with torch.no_grad():
        plain = {kind: base(**x, use_cache=False).logits for kind, x in inputs.items()}
    # as the folder's model card says (README.md): the adapter as a subfolder of the model's folder
    assert f'PeftModel.from_pretrained(model, "{folder.resolve()}", subfolder="lora_adapter")' in \
        (folder / "README.md").read_text()
    model = PeftModel.from_pretrained(base, str(folder.resolve()), subfolder="lora_adapter").eval()
    for kind, x in inputs.items():
        with torch.no_grad():
            out_logits = model(**x, use_cache=False).logits
        ref = torch.as_tensor(logits[layout][name][kind])
        torch.testing.assert_close(out_logits, ref, **TOL, msg=lambda m: f"{name} ({layout}) / {kind}: {m}")
        assert (plain[kind] - ref).abs().max() > 1e-3  # the adapters matter: the base alone differs
    if name == "casa_lora":  # q/k/v and gate/up each got an adapter; the encoder's blocks too
        targets = config["target_modules"]
        assert any(t.endswith("self_attn.q_proj") for t in targets) and any(t.endswith("mlp.up_proj") for t in targets)
        assert config["r"] == 4 and config["rank_pattern"] and set(config["rank_pattern"].values()) == {2}
        # rsLoRA on the LM decides PEFT's use_rslora; the encoder's plain alpha / rank = 4 / 2 is
        # written as the alpha that gives 2 under alpha / sqrt(rank)
        assert config["use_rslora"] is True and config["lora_alpha"] == 8.0
        assert {round(a, 6) for a in config["alpha_pattern"].values()} == {round(2 * 2 ** 0.5, 6)}
    elif name == "insertion_lora_mlp":
        assert all(t.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for t in config["target_modules"])
    else:  # Helium: DoRA on q/k/v/o of layers 0 and 3 only
        assert {t.split(".")[-1] for t in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert config["use_dora"] is True
    assert config["use_dora"] == (name == "casa_helium_dora_attention")


def test_separate_without_adapters_is_refused(separate):
    _, _, results = separate
    code, err = results[-1]
    assert code == 2 and "holds no LoRA adapters" in err


def test_lora_modes_are_checked_before_the_load():
    import dataclasses

    from support.vlm import small_model_config

    from casa_megatron.config import LoRAConfig
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.exporter import _check_lora_mode

    adapted = dataclasses.replace(small_model_config(), freeze_lm=True, lora=LoRAConfig(rank=2))
    _check_lora_mode("separate", adapted)
    _check_lora_mode("merge", small_model_config())
    with pytest.raises(ConversionError, match="--lora 'split' not in"):
        _check_lora_mode("split", adapted)


def test_adapter_keys_name_the_modules_of_each_format():
    """PEFT addresses modules: the casa remote code's are its checkpoint names; transformers'
    Qwen2.5-VL renames its checkpoint's ``model.*`` / ``visual.*`` on load (checked end to end in
    tests/model/test_insertion_qwen.py), and a module it does not have is refused."""
    from support.qwen_vl import hf_qwen_vl

    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.hf_formats import module_path
    from casa_megatron.conversion.lora_export import check_modules

    assert module_path("casa", "model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj"
    assert module_path("casa", "visual.blocks.1.attn.qkv.weight") == "visual.blocks.1.attn.qkv"
    assert module_path("qwen2_5_vl", "model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj"
    assert module_path("qwen2_5_vl", "visual.blocks.1.attn.qkv.weight") == "model.visual.blocks.1.attn.qkv"
    config = hf_qwen_vl().config.to_dict()
    check_modules(config, {"target_modules": ["model.language_model.layers.1.self_attn.o_proj",
                                              "model.visual.blocks.0.mlp.down_proj"]})
    with pytest.raises(ConversionError, match=r"1 adapted modules are not in .*\['model.layers.1.self_attn.o_proj'\]"):
        check_modules(config, {"target_modules": ["model.layers.1.self_attn.o_proj"]})


def test_our_tools_merge_the_exported_adapter(separate, capsys):
    """``casa-stream`` / ``casa-eval`` load an export through ``inference.model_folder.load_model``:
    a ``--lora separate`` folder gives the trained model (its adapter merged through PEFT, and
    said so), not the base that transformers alone would load; ``adapter="none"`` gives the base."""
    from casa_megatron.inference.model_folder import load_model

    out, logits, _ = separate
    folder = out / "casa_lora-tp2"
    x = hf_inputs(make_case("image"))
    ref = torch.as_tensor(logits["tp2"]["casa_lora"]["image"])
    got = {}
    for adapter in ("auto", str(folder / "lora_adapter"), "none"):
        model, _ = load_model(folder, adapter=adapter)
        with torch.no_grad():
            got[adapter] = model(**x, use_cache=False).logits
        assert type(model).__name__ == "CasaForCausalLM"  # merged and unwrapped: the remote class itself
    torch.testing.assert_close(got["auto"], ref, **TOL)
    torch.testing.assert_close(got[str(folder / "lora_adapter")], ref, **TOL)
    assert (got["none"] - ref).abs().max() > 1e-3
    assert capsys.readouterr().err.count("merged into the model") == 2


def test_stream_on_a_separate_export_equals_the_merged_export(exported, separate, tmp_path):
    import numpy as np

    from casa_megatron.data.video.encode import encode_video
    from casa_megatron.inference.cli import main

    rng = np.random.default_rng(0)
    video = tmp_path / "clip.mp4"
    video.write_bytes(encode_video([rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(20)], fps=10))
    runs = {"merged": (exported[0] / "casa_lora", []), "separate": (separate[0] / "casa_lora-tp2", []),
            "base": (separate[0] / "casa_lora-tp2", ["--adapter", "none"])}
    results = {}
    for name, (folder, extra) in runs.items():
        code = main([str(video), "--model", str(folder), "--out", str(tmp_path / name), "--max-new-tokens", "4",
                     "--decoder", "cpu", *extra])
        assert code == 0, name
        results[name] = json.loads((tmp_path / name / "stream.json").read_text())
    tokens = {name: [f["tokens"] for f in r["frames"]] for name, r in results.items()}
    assert len(tokens["merged"]) == 4 and tokens["separate"] == tokens["merged"]
    assert results["separate"]["adapter"] == str(separate[0] / "casa_lora-tp2" / "lora_adapter")
    assert results["base"]["adapter"] is None and results["merged"]["adapter"] is None


def test_a_wrong_adapter_is_named(separate, tmp_path, monkeypatch):
    import sys

    from casa_megatron.evaluation.cli import main as eval_main
    from casa_megatron.inference.model_folder import NotAnHFFolder, load_model, resolve_adapter

    folder = separate[0] / "casa_lora-tp2"
    with pytest.raises(NotAnHFFolder, match=r"nowhere is not a PEFT adapter folder \(no adapter_config.json\)"):
        resolve_adapter(folder, str(tmp_path / "nowhere"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # before any model is built
        code = eval_main(["--data", str(tmp_path), "--hf", str(folder), "--adapter", str(tmp_path)])
    assert code == 2 and "is not a PEFT adapter folder" in err.getvalue(), err.getvalue()
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(NotAnHFFolder, match=r"comes with a LoRA adapter .* needs peft .* --adapter none"):
        load_model(folder)


def _import_both(rank, world, separate_dir, merged_dir, root):
    from support.export import load_weights

    from casa_megatron.conversion.cli import main

    for src, name in ((separate_dir, "from_separate"), (merged_dir, "from_merged")):
        assert main(["import-hf", src, f"{root}/{name}", "model.transformer_impl=local", "--no-progress"]) == 0
    ours, merged = load_weights(f"{root}/from_separate"), load_weights(f"{root}/from_merged")
    return sorted(ours) == sorted(merged), max((ours[n] - merged[n]).abs().max().item() for n in ours), len(ours)


def test_import_of_a_separate_export_merges_its_adapter(exported, separate, tmp_path):
    """Round trip: ``export-hf --lora separate`` -> ``import-hf`` (the folder's ``lora_adapter/``
    merged as it is read) gives the tensors of ``export-hf`` (merged) -> ``import-hf``; without the
    merge the import would be the untrained base."""
    (same_names, diff, count), = run_distributed(_import_both, world_size=1,
                                                 separate_dir=str(separate[0] / "casa_lora-tp2"),
                                                 merged_dir=str(exported[0] / "casa_lora"), root=str(tmp_path))
    assert same_names and count > 20 and diff < 1e-5, diff


def test_lm_and_encoder_adapters_that_disagree_on_dora_are_refused_apart():
    """PEFT's use_dora holds for every module of an adapter: DoRA on the LM and plain LoRA on the
    encoder cannot be one PEFT adapter (``--lora merge`` folds both)."""
    import dataclasses

    from support.vlm import small_model_config

    from casa_megatron.config import LoRAConfig
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.lora_export import _config

    cfg = dataclasses.replace(small_model_config(), freeze_lm=True, lora=LoRAConfig(rank=2, dora=True))
    cfg.vision = dataclasses.replace(cfg.vision, trainable_blocks=0, lora=LoRAConfig(rank=2))
    assert _config(cfg, {"model.layers.0.self_attn.q_proj": "lm"})["use_dora"] is True
    with pytest.raises(ConversionError, match="dora differ: a PEFT adapter has one use_dora"):
        _config(cfg, {"model.layers.0.self_attn.q_proj": "lm", "visual.blocks.0.attn.qkv": "vision"})

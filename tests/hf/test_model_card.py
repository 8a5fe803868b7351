"""The model card (``README.md``) that ``export-hf`` writes into every folder
(``conversion/model_card.py``): its Hub header as ``huggingface_hub`` parses it, its facts against
the folder's own files, its "Use" snippet run as written in a fresh interpreter, and its results
taken at the exported step."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, "one python snippet"
    return blocks[0]


def _row(card: str, key: str) -> str:
    found = re.findall(rf"^\| {re.escape(key)} \| (.*) \|$", card, re.M)
    assert len(found) == 1, f"row {key!r}"
    return found[0]


def test_exported_card_header_facts_and_snippet(exported, tmp_path):
    """The Hub reads the header (transformers, image-text-to-text, remote code); the card's fusion
    layers and parameter count are the folder's; the snippet, run as written in a new interpreter
    (nothing of casa_megatron imported), answers as generate() does here."""
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder = exported[0] / "casa_parallel"
    card_text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    header = card.data.to_dict()
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-text-to-text"
    assert {"casa", "custom_code", "casa_megatron"} <= set(header["tags"]) and "base_model" not in header

    config = json.loads((folder / "config.json").read_text())
    assert _row(card_text, "fusion layers") == ", ".join(map(str, config["fusion_layers"]))
    numel = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            numel += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    assert _row(card_text, "parameters") == f"{numel:,}"
    assert _row(card_text, "step").startswith("1 of ")  # the fixture's one training step

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)).save(tmp_path / "image.jpg")
    snippet = _snippet(card_text)
    script = snippet + "\nimport sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'casa_megatron'))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer, leaked = proc.stdout.rstrip("\n").split("\n")[-2:]
    assert leaked == "[]"

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[Image.open(tmp_path / "image.jpg").convert("RGB")])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1] and answer == expected


def _training_checkpoint(run_dir, step: int, checkpoint_dir=None):
    """A ``checkpoints/iter_N`` folder with its ``config.yaml``, as the card reads it."""
    import dataclasses

    from casa_megatron.config.loader import save_config
    from casa_megatron.config.schema import CheckpointConfig, TrainConfig
    from casa_megatron.conversion.checkpoint_source import CheckpointSource
    from casa_megatron.data.config import DataConfig

    data = DataConfig(sources=[{"path": "data/a", "weight": 3}, {"path": "data/b", "weight": 1}])
    cfg = TrainConfig(data=data, train_steps=200, run_dir=str(run_dir),
                      checkpoint=CheckpointConfig(dir=str(checkpoint_dir) if checkpoint_dir else None))
    path = (checkpoint_dir or run_dir / "checkpoints") / f"iter_{step:07d}"
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    return CheckpointSource("training", path, path, dataclasses.replace(cfg.model), cfg.data, step=step)


def test_card_results_are_the_exported_steps(tmp_path):
    """An ``iter_100`` exported after the run logged step 200 gets step 100's rows (a line cut
    short by a killed run passed over); a checkpoint dir elsewhere finds the run by its run_dir;
    a run without rows at that step gets no results section."""
    from casa_megatron.conversion.exporter import _card

    run = tmp_path / "run"
    rows = [{"step": 100, "loss": 1.5}, {"step": 100, "valid_loss": 1.75},
            {"step": 100, "generation": {"all": 0.25, "caption/caption_f1": 0.5}},
            {"step": 200, "loss": 0.5}, {"step": 200, "valid_loss": 0.75}, {"step": 200, "generation": {"all": 0.75}}]
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 200, "lo')
    source = _training_checkpoint(run, 100)
    card = _card(tmp_path / "out", "casa", source, source.model, [], "float32", "merge", None, (), None)[0]
    assert "## Results at step 100" in card
    assert (_row(card, "train/loss"), _row(card, "valid_loss"), _row(card, "generation/all"),
            _row(card, "generation/caption/caption_f1")) == ("1.5000", "1.7500", "0.2500", "0.5000")
    assert _row(card, "data") == "`data/a` (weight 3), `data/b` (weight 1)"
    assert _row(card, "step") == "100 of 200"

    elsewhere = _training_checkpoint(run, 200, checkpoint_dir=tmp_path / "fast_disk" / "ckpts")
    card = _card(tmp_path / "out", "casa", elsewhere, elsewhere.model, [], "float32", "merge", None, (), None)[0]
    assert _row(card, "train/loss") == "0.5000" and _row(card, "generation/all") == "0.7500"

    assert "loss.png" not in card  # the run drew no curves
    (run / "loss.png").write_bytes(b"png")
    card, shown = _card(tmp_path / "out", "casa", source, source.model, [], "float32", "merge", None, (), None)
    assert shown == {"loss.png": run / "loss.png"}  # copied into the folder
    assert "![The run's loss curves and held-out accuracy](loss.png)" in card
    assert "drawn to step 200, past this checkpoint's step 100." in card

    other = tmp_path / "other"
    other.mkdir()
    lone = _training_checkpoint(other, 300)
    card = _card(tmp_path / "out", "casa", lone, lone.model, [], "float32", "merge", None, (), None)[0]
    assert "## Results" not in card and "## Training" in card


def test_card_base_model_and_native_format(tmp_path):
    """An import whose saved HF config names a Hub id gives the card its base_model (a local path
    does not); the native Qwen2.5-VL format needs no remote code and its snippet is Python."""
    from huggingface_hub import ModelCard

    from casa_megatron.config.schema import FusionConfig, ModelConfig, VisionConfig
    from casa_megatron.conversion.checkpoint_source import CheckpointSource
    from casa_megatron.conversion.exporter import _card
    from casa_megatron.data.config import DataConfig

    model = ModelConfig(vision=VisionConfig(encoder="qwen2_5_vl"), fusion=FusionConfig(mechanism="insertion"))
    folder = tmp_path / "import"
    folder.mkdir()
    source = CheckpointSource("import", folder, folder / "weights", model, DataConfig())
    for name_or_path, base in (("Qwen/Qwen2.5-VL-3B-Instruct", ["Qwen/Qwen2.5-VL-3B-Instruct"]),
                               (str(tmp_path), None)):
        (folder / "hf_config.json").write_text(json.dumps({"_name_or_path": name_or_path}))
        card = _card(tmp_path / "out", "qwen2_5_vl", source, model, [], "bfloat16", "merge", "org/name", (),
                     "apache-2.0")[0]
        (tmp_path / "README.md").write_text(card)
        header = ModelCard.load(tmp_path / "README.md").data.to_dict()
        assert header.get("base_model") == base and header["license"] == "apache-2.0"
        assert "custom_code" not in header["tags"] and "## Training" not in card
    snippet = _snippet(card)
    ast.parse(snippet)
    assert "Qwen2_5_VLForConditionalGeneration.from_pretrained(\"org/name\")" in snippet
    assert "trust_remote_code" not in snippet
    given = _card(tmp_path / "out", "qwen2_5_vl", source, model, [], "bfloat16", "merge", None, ["a/b", "c/d"],
                  None)[0]
    (tmp_path / "README.md").write_text(given)
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["base_model"] == ["a/b", "c/d"]


def test_evaluation_results_must_be_of_the_exported_checkpoint(tmp_path, monkeypatch):
    """casa-eval's eval.json names the checkpoint it scored by its manifest digest: accepted from
    anywhere (another working directory, a copied checkpoint), refused for another checkpoint,
    naming both; older results without a digest must name the same folder. The card then shows
    the scores, and the Hub's parser reads them from its model-index."""
    from huggingface_hub import ModelCard

    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.exporter import _card
    from casa_megatron.conversion.model_card import read_evaluation
    from casa_megatron.training.ckpt_manifest import manifest_digest

    source = _training_checkpoint(tmp_path / "run", 200)
    (source.path / "manifest.json").write_text(json.dumps({"format": 1, "step": 200, "files": {"a": {"size": 1}}}))
    other = tmp_path / "other" / "iter_0000200"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"format": 1, "step": 200, "files": {"a": {"size": 2}}}))
    scores = {"all": {"n": 4, "accuracy": 0.75}, "task:colour": {"n": 2, "accuracy": 0.5},
              "caption": {"frames_with_reference": 3, "caption_f1": 0.625, "caption_exact": 0.0,
                          "frames_without_reference": 1, "silence_accuracy": 1.0}}

    def written(name, folder, digest):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"data": "held/out", "checkpoint": "x", "checkpoint_folder": folder,
                                    "checkpoint_digest": digest, "hf": None, "max_new_tokens": 8,
                                    "sides": {"megatron": {"scores": scores}}}))
        return path

    monkeypatch.chdir(tmp_path / "other")  # the folder name written relative to another directory
    ok = read_evaluation(written("digest", "checkpoints/iter_0000200", manifest_digest(source.path)), source.path)
    with pytest.raises(ConversionError, match="another manifest.*iter_0000200"):
        read_evaluation(written("other", str(source.path), manifest_digest(other)), source.path)
    assert read_evaluation(written("old_same", str(source.path), None), source.path)["scores"]["megatron"] == scores
    with pytest.raises(ConversionError, match="not the exported checkpoint"):
        read_evaluation(written("old_other", str(other), None), source.path)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConversionError, match="not an eval.json"):
        read_evaluation(tmp_path / "junk.json", source.path)

    card = _card(tmp_path / "out", "casa", source, source.model, [], "float32", "merge", None, (), None, [ok])[0]
    assert _row(card, "task:colour").startswith("2 | 0.5000")
    assert _row(card, "caption token F1") == "3 frames | 0.6250"
    (tmp_path / "README.md").write_text(card)
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in results} == {("out", "accuracy", 0.75),
                                                                                   ("out", "f1", 0.625)}

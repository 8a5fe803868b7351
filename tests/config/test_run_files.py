"""config/run_files.py: the chat template's text is saved with the run and every checkpoint, and
whoever reads a saved run (export-hf, casa-eval, a resume) uses or compares that copy, not the
file the config names, which may have changed since.

Unit tests on folders written by ``save_run_config``; one run of ``casa-train`` on the generated
dataset for the wiring (checkpoint + run dir + manifest, the export's template, the resume warning)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from casa_megatron.config.run_files import TEMPLATE_COPY, save_run_config, template_drift, with_saved_template
from casa_megatron.data.config import DataConfig

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


class _Run:  # what save_run_config needs of a TrainConfig
    def __init__(self, data):
        self.data = data


def _saved(tmp_path, text=TEMPLATE):
    original = tmp_path / "template.jinja"
    original.write_text(text)
    folder = tmp_path / "iter_0000002"
    folder.mkdir()
    from casa_megatron.config.schema import TrainConfig

    cfg = TrainConfig()
    cfg.data = DataConfig(chat_template=str(original))
    save_run_config(cfg, folder)
    return original, folder


def test_the_copy_is_saved_and_read_back(tmp_path, caplog):
    original, folder = _saved(tmp_path)
    assert (folder / TEMPLATE_COPY).read_text() == TEMPLATE
    assert (folder / "config.yaml").is_file()
    data = DataConfig(chat_template=str(original))
    with caplog.at_level(logging.INFO):
        same = with_saved_template(data, folder)
    assert same.chat_template == str(folder / TEMPLATE_COPY) and same.chat_template_text() == TEMPLATE
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert template_drift(data, folder) is None


def test_an_edited_template_is_warned_about_and_the_trained_one_used(tmp_path, caplog):
    original, folder = _saved(tmp_path)
    original.write_text(TEMPLATE.replace(": ", " says: "))
    data = DataConfig(chat_template=str(original))
    with caplog.at_level(logging.WARNING):
        read = with_saved_template(data, folder)
    assert read.chat_template_text() == TEMPLATE
    assert any("changed since" in r.getMessage() and str(original) in r.getMessage() for r in caplog.records)
    drift = template_drift(data, folder)
    assert drift is not None and "iter_0000002 was trained with" in drift and str(original) in drift
    # back to the tokenizer's own template on resume: said too
    assert "the tokenizer's own template" in template_drift(DataConfig(), folder)


def test_a_deleted_template_is_read_from_the_copy(tmp_path):
    original, folder = _saved(tmp_path)
    original.unlink()
    assert with_saved_template(DataConfig(chat_template=str(original)), folder).chat_template_text() == TEMPLATE
    assert "cannot be read" in template_drift(DataConfig(chat_template=str(original)), folder)


def test_no_template_writes_no_copy_and_older_checkpoints_keep_the_path(tmp_path):
    from casa_megatron.config.schema import TrainConfig

    folder = tmp_path / "run"
    folder.mkdir()
    save_run_config(TrainConfig(), folder)
    assert not (folder / TEMPLATE_COPY).exists() and (folder / "config.yaml").is_file()
    data = DataConfig(chat_template=str(tmp_path / "t.jinja"))
    assert with_saved_template(data, folder) is data  # a checkpoint from before the copy existed
    assert template_drift(data, folder) is None


@pytest.fixture(scope="module")
def trained_with_template(tmp_path_factory):
    """A 2-step run of the main job's config with ``data.chat_template`` (the generated tokenizer's
    own template, in a file of its own), checkpointed at step 2."""
    from casa_megatron.data.synthetic_dataset import CHAT_TEMPLATE, make_dataset

    root = tmp_path_factory.mktemp("template_run")
    make_dataset(root / "data", num_images=8, num_videos=0, num_multi=0, seed=4, samples_per_shard=8, progress=False)
    template = root / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    run = root / "run"
    base = [sys.executable, "-m", "casa_megatron.train", str(ROOT / "configs/tiny_cpu.yaml"), f"run_dir={run}",
            f"data.source={root}/data/shards", f"data.chat_template={template}", "checkpoint.save_interval=2",
            "log_interval=1", "tracking.enabled=false", "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=1"]
    proc = subprocess.run(base + ["train_steps=2"], capture_output=True, text=True, timeout=600, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run, template, base


def test_training_saves_the_template_and_export_uses_it_after_an_edit(trained_with_template, caplog):
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.conversion.checkpoint_source import locate_checkpoint
    from casa_megatron.data.synthetic_dataset import CHAT_TEMPLATE
    from casa_megatron.evaluation.checkpoint_model import checkpoint_config
    from casa_megatron.hf.layout_map import export_fields

    root, run, template, base = trained_with_template
    checkpoint = run / "checkpoints" / "iter_0000002"
    assert (checkpoint / TEMPLATE_COPY).read_text() == CHAT_TEMPLATE == (run / TEMPLATE_COPY).read_text()
    assert TEMPLATE_COPY in json.loads((checkpoint / "manifest.json").read_text())["files"]
    edited = CHAT_TEMPLATE + "{# edited after training #}"
    template.write_text(edited)
    with caplog.at_level(logging.WARNING):
        source = locate_checkpoint(run)
        cfg, _ = checkpoint_config(run / "checkpoints")
    assert source.data.chat_template_text() == CHAT_TEMPLATE == cfg.data.chat_template_text()
    assert sum("changed since" in r.getMessage() for r in caplog.records) == 1  # once per process
    # what export-hf writes as the folder's template and processor template: the trained one
    fields = export_fields(ModelConfig(), source.data)
    assert fields.processor["chat_template"] == CHAT_TEMPLATE

    # the tokenizer is in the checkpoint too: with the data set's own gone, export and casa-eval use it
    from types import SimpleNamespace

    from casa_megatron.conversion.exporter import resolve_tokenizer
    from casa_megatron.evaluation.cli import settings_for

    saved = checkpoint / "tokenizer"
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert (saved / "tokenizer_config.json").is_file() and "tokenizer/tokenizer.json" in manifest
    original = root / "data" / "tokenizer"
    assert (saved / "tokenizer.json").read_bytes() == (original / "tokenizer.json").read_bytes()
    original.rename(root / "moved_tokenizer")
    try:
        assert resolve_tokenizer(locate_checkpoint(checkpoint), None) == saved
        args = SimpleNamespace(checkpoint=str(checkpoint), tokenizer=None, hf=None)
        assert settings_for(args).tokenizer_path == str(saved)
    finally:
        (root / "moved_tokenizer").rename(original)

    # a resume with the edited file is told so, and its next checkpoint keeps the new text
    proc = subprocess.run(base + ["train_steps=4"], capture_output=True, text=True, timeout=600, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not with the template iter_0000002 was trained with" in proc.stderr
    assert (run / "checkpoints" / "iter_0000004" / TEMPLATE_COPY).read_text() == edited


def _checkpoint_with_tokenizer(tmp_path, name, files):
    """(a tokenizer folder holding ``files``, a checkpoint folder saved from a run using it, the run config)."""
    from casa_megatron.config.schema import TrainConfig

    source = tmp_path / "tokenizer_source"
    for file in files:
        (source / file).parent.mkdir(parents=True, exist_ok=True)
        (source / file).write_text(file)
    cfg = TrainConfig()
    cfg.data = DataConfig(tokenizer_path=str(source))
    folder = tmp_path / name
    folder.mkdir()
    save_run_config(cfg, folder, tokenizer=True)
    return source, folder, cfg


def test_only_the_tokenizer_files_are_copied(tmp_path):
    """``data.tokenizer_path`` may be an import folder holding the weights: only the tokenizer's
    own files go into the checkpoint, and nothing without a tokenizer (the in-memory task)."""
    from casa_megatron.config.run_files import copy_tokenizer, saved_tokenizer

    source, folder, _ = _checkpoint_with_tokenizer(tmp_path, "iter_0000001", (
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.yaml", "weights/x.distcp"))
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert saved_tokenizer(folder) == folder / "tokenizer"
    assert copy_tokenizer(DataConfig(), tmp_path / "none") == 0 and not (tmp_path / "none").exists()
    assert saved_tokenizer(tmp_path) is None


def test_a_resume_with_another_tokenizer_is_told(tmp_path):
    from casa_megatron.config.run_files import tokenizer_drift

    source, folder, cfg = _checkpoint_with_tokenizer(tmp_path, "iter_0000004", ("tokenizer.json",
                                                                                "tokenizer_config.json"))
    assert tokenizer_drift(cfg.data, folder) is None
    (source / "tokenizer.json").write_text("another vocabulary")
    drift = tokenizer_drift(cfg.data, folder)
    assert drift and "not the one iter_0000004 was trained with" in drift and "tokenizer.json differ" in drift
    (source / "added_tokens.json").write_text("{}")  # a file the checkpoint's copy lacks counts too
    assert "tokenizer.json, added_tokens.json differ" in tokenizer_drift(cfg.data, folder)
    assert tokenizer_drift(cfg.data, tmp_path) is None  # no copy: an older checkpoint

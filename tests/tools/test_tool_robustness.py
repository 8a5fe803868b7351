"""Tools that used to crash or leave debris: ``describe_model.py --help``; a killed
``make_synthetic_data.py`` leaving its hidden temporary folder behind."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_describe_model_help_and_bad_config():
    done = subprocess.run([sys.executable, "tools/describe_model.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: describe_model.py" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "tools/describe_model.py", "missing.yaml"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "config error: config file missing.yaml does not exist"


def _start_generator(out: Path):
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "make_synthetic_data.py"), "--out", str(out),
                             "--num-images", "5000", "--num-videos", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_temporary(parent: Path, proc) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        found = [p for p in parent.glob(".data.tmp-*") if any(p.rglob("*.png"))]
        if found:
            return found[0]
        assert proc.poll() is None, "the generator ended before writing anything"
        time.sleep(0.05)
    raise AssertionError("no temporary folder appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_generator_leaves_no_temporary_folder(tmp_path, sig):
    proc = _start_generator(tmp_path / "data")
    tmp = _wait_for_temporary(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:  # cleaned up on the way out
        assert not tmp.exists()
    else:  # SIGKILL cannot be caught: the next run removes what the dead process left
        assert tmp.exists()
        spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "tools" / "make_synthetic_data.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main(["--out", str(tmp_path / "data"), "--num-images", "2", "--num-videos", "0"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _describe(rank, world, argv):
    import contextlib
    import io

    spec = importlib.util.spec_from_file_location("describe_model", REPO / "tools" / "describe_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main(argv) == 0
    return out.getvalue()


def test_describe_model_shows_what_each_pipeline_stage_holds():
    """With PP > 1 the parameter budget is split by stage: the stages hold every parameter once
    (tied embeddings: plus the last stage's copy), the first one the encoder and projector too."""
    from support.dist import run_distributed

    def stages(*overrides):
        text = run_distributed(_describe, world_size=1, argv=[
            str(REPO / "configs" / "tiny_cpu_synthetic.yaml"), "model.lm.num_layers=4",
            "parallel.pipeline_model_parallel_size=2", *overrides])[0]
        lines = text.splitlines()
        total = int(next(l for l in lines if l.startswith("total")).split()[1].replace(",", ""))
        after = lines[lines.index(next(l for l in lines if l.startswith("stage"))) + 1:]
        rows = [l.split() for l in after[:next(i for i, l in enumerate(after + ["end"]) if not l[:1].isdigit())]]
        return total, [(int(r[1]), int(r[3].replace(",", ""))) for r in rows], text

    total, rows, text = stages("parallel.num_layers_in_first_pipeline_stage=1")
    assert "pipeline: 2 stages: layers 0 | 1-3" in text
    assert [layers for layers, _ in rows] == [1, 3] and sum(p for _, p in rows) == total
    _, even, _ = stages()
    assert [layers for layers, _ in even] == [2, 2]
    per_layer = rows[1][1] - even[1][1]  # the last stage gained one layer
    assert per_layer > 0 and rows[0][1] == even[0][1] - per_layer
    tied_total, tied, _ = stages("model.lm.tie_word_embeddings=true")
    assert sum(p for _, p in tied) == tied_total + 16 * 64  # vocab x hidden, the last stage's copy
    # the encoder over both stages: stage 0 keeps the embedding, patch embedding and block 0 only
    _, split, text = stages("parallel.vision_blocks_per_pipeline_stage=[1,1]")
    assert "pipeline: 2 stages: encoder blocks 0 | encoder blocks 1 + layers 0-3" in text
    assert [layers for layers, _ in split] == [0, 4] and sum(p for _, p in split) == total
    # stage 0 gave up 2 LM layers, encoder block 1, the encoder's final norm and the projector
    assert 0 < split[0][1] < even[0][1] - 2 * per_layer
    # virtual stages with CASA on layers 2 and 3 only: rank 0 holds layers 0 and 2 (one CASA layer),
    # not 0 and 1 (none), so one CASA layer's weights move from rank 1 to rank 0
    _, plain_casa, _ = stages("model.fusion.layers=[2,3]")
    _, chunked, text = stages("model.fusion.layers=[2,3]", "parallel.virtual_pipeline_model_parallel_size=2")
    assert "pipeline: 2 ranks x 2 chunks: rank 0 layers 0, 2 | rank 1 layers 1, 3" in text
    assert [layers for layers, _ in chunked] == [2, 2]
    casa = chunked[0][1] - plain_casa[0][1]
    assert casa > 0 and chunked[1][1] == plain_casa[1][1] - casa


def test_describe_model_counts_lora_adapters_apart():
    """LoRA adapters get their own row: r * (in + out) per adapted linear, new and trainable, and
    the frozen LM's own weights none of either."""
    from support.dist import run_distributed

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig

    config = str(REPO / "configs" / "tiny_cpu_synthetic.yaml")
    overrides = ["model.freeze_lm=true", "model.lora.rank=2", "model.lora.layers=[1]"]
    text = run_distributed(_describe, world_size=1, argv=[config, *overrides])[0]
    rows = {l[:18].strip(): [int(x.replace(",", "")) for x in l[18:].split()] for l in text.splitlines()
            if l[:18].strip() in ("decoder", "decoder (LoRA)")}
    lm = load_config(TrainConfig, config, overrides).model.lm
    h, qkv = lm.hidden_size, (lm.num_attention_heads + 2 * lm.num_query_groups) * lm.head_dim
    expected = 2 * ((h + qkv) + (lm.num_attention_heads * lm.head_dim + h) + (h + 2 * lm.ffn_hidden_size)
                    + (lm.ffn_hidden_size + h))
    assert rows["decoder (LoRA)"] == [expected] * 3
    assert rows["decoder"][1:] == [0, 0]
    assert "LoRA rank 2, alpha 32 on linear_qkv, linear_proj, linear_fc1, linear_fc2 of LM layers [1]" in text

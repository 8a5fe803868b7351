"""``log_params_norm`` (Megatron-LM's ``--log-params-norm``): the logged norm is the L2 norm of
the trained weights the checkpoint holds, and TP=2 + SP (duplicated norms counted once) and PP=2
with tied embeddings (the last stage's copy not counted) log the one-process values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.dist import run_distributed

from casa_megatron.config import load_config
from casa_megatron.config.schema import TrainConfig

RUN = ["train_steps=3", "log_interval=1", "checkpoint.save_interval=3", "optimizer.warmup_steps=1",
       "optimizer.wsd_decay_steps=0", "tracking.enabled=false", "log_params_norm=true",
       "model.lm.tie_word_embeddings=true", "model.vision.trainable_blocks=1"]


def _train(rank, world, run_dir, overrides):
    from casa_megatron.training.loop import train

    train(load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*RUN, f"run_dir={run_dir}", *overrides]))


def _norms(run_dir):
    return [json.loads(line)["params_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("params_norm") / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[])
    return run_dir


def test_the_logged_norm_is_that_of_the_trained_weights(one_process):
    from casa_megatron.training.checkpoint import read_tensors

    tensors = read_tensors(one_process / "checkpoints/iter_0000003")
    prefix = "optimizer.state.param."  # the optimizer's copy of each trained weight, under the model's name
    trained = [n for n in tensors if n.startswith(prefix)]
    assert any(n.startswith(prefix + "vision.blocks.1.") for n in trained)
    assert not any(n.startswith(prefix + "vision.blocks.0.") for n in trained)  # frozen: not in the norm
    assert all(torch.equal(tensors[n], tensors[n[len(prefix):]]) for n in trained)  # fp32: the weights themselves
    want = np.sqrt(sum(float(tensors[n].double().pow(2).sum()) for n in trained))
    norms = _norms(one_process)
    assert len(norms) == 3 and norms[-1] == pytest.approx(want, rel=1e-9)
    assert norms[0] != norms[-1]  # it follows the updates


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
                                    ["parallel.pipeline_model_parallel_size=2"]], ids=["tp2_sp", "pp2_tied"])
def test_parallel_layouts_log_the_one_process_norm(one_process, tmp_path, layout):
    run_distributed(_train, world_size=2, run_dir=str(tmp_path / "run"), overrides=layout)
    assert _norms(tmp_path / "run") == pytest.approx(_norms(one_process), rel=1e-5)

"""``checkpoint.optimizer_format``: the distributed optimizer's state saved ``dp_reshardable`` (every
rank writes its own shard; Megatron-LM's default) resumes exactly, loads at another data-parallel
size with the same per-parameter state as ``fully_reshardable``, and a resume at another TP / PP
is refused before anything is written. Two gloo processes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from support.dist import run_distributed
from test_overlap import OVERLAP, _rows, _train

DP_RESHARDABLE = "checkpoint.optimizer_format=dp_reshardable"
BUCKETS = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
           f"parallel.ddp_bucket_size={OVERLAP['ddp_bucket_size']}"]  # several buckets per buffer


def test_dp_reshardable_resumes_to_the_uninterrupted_losses_and_the_format_may_change(tmp_path):
    """Resumed at step 5 in the format it was written in, and in the other one (a load reads the
    checkpoint's own format): both repeat the uninterrupted run's losses exactly. Before the Adam
    step was restored per parameter, this format resumed with Adam's bias correction restarted
    (step 1 instead of 5) and the losses parted from step 7 on."""
    run = tmp_path / "run"
    run_distributed(_train, world_size=2, run_dir=str(run), overrides=[DP_RESHARDABLE, *BUCKETS], steps=8)
    for name, fmt in (("same", DP_RESHARDABLE), ("switched", "checkpoint.optimizer_format=fully_reshardable")):
        resumed = tmp_path / name
        shutil.copytree(run, resumed)
        shutil.rmtree(resumed / "checkpoints/iter_0000008")
        run_distributed(_train, world_size=2, run_dir=str(resumed), overrides=[fmt, *BUCKETS], steps=8)
        for ref, got in zip(_rows(run), _rows(resumed), strict=True):
            assert got["step"] == ref["step"] and got["loss"] == ref["loss"], (name, got["step"])


def _build(rank, world, overrides):
    import torch

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      ["optimizer.warmup_steps=2", "optimizer.wsd_decay_steps=0", *BUCKETS, *overrides])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    return (cfg, model, ddp, *build_optimizer(ddp, cfg))


def _train_and_save(rank, world, directory, optimizer_format):
    import dataclasses

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from casa_megatron.data import make_train_iterator
    from casa_megatron.training.checkpoint import Checkpointer
    from casa_megatron.training.optimizer import finish_param_gather
    from casa_megatron.training.step import forward_step

    cfg, model, ddp, optimizer, scheduler = _build(rank, world, [])
    data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
    data = make_train_iterator(data_cfg, cfg.micro_batch_size, rank, world, 0, fusion="casa")
    for _ in range(3):
        ddp[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=ddp.chunks,
                                    num_microbatches=2, seq_length=54, micro_batch_size=2)
        optimizer.step()
        scheduler.step(increment=1)
    finish_param_gather(ddp)
    Checkpointer(directory, optimizer_format=optimizer_format).save(3, model, optimizer, scheduler,
                                                                      data.state_dict(), cfg)


def _load_state(rank, world, directory):
    """Per model parameter (one process: whole tensors): fp32 master weight, Adam moments, step."""
    from casa_megatron.training.checkpoint import Checkpointer

    _, model, _, optimizer, scheduler = _build(rank, world, [])
    ckpt = Checkpointer(directory)  # saves fully_reshardable: the load reads the checkpoint's own format
    ckpt.load(ckpt.latest(), model, optimizer, scheduler)
    names = {param: name for name, param in model.named_parameters()}
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_param, (group, order) in opt.model_param_group_index_map.items():
            main = opt.optimizer.param_groups[group]["params"][order]
            state = opt.optimizer.state[main]
            out[names[model_param]] = {"param": main.detach().clone(), "exp_avg": state["exp_avg"].clone(),
                                       "exp_avg_sq": state["exp_avg_sq"].clone(), "step": float(state["step"])}
    return out


def test_dp_reshardable_loads_at_another_data_parallel_size_with_the_fully_reshardable_state(tmp_path):
    """Written by 2 data-parallel ranks (each its own shard, several buckets), read by 1: every
    parameter's fp32 weight, both Adam moments and step equal what the fully_reshardable
    checkpoint of the same run gives (tests/training/test_overlap.py checks that one against the
    one-bucket run)."""
    loaded = {}
    for fmt in ("fully_reshardable", "dp_reshardable"):
        run_distributed(_train_and_save, world_size=2, directory=str(tmp_path / fmt), optimizer_format=fmt)
        loaded[fmt] = run_distributed(_load_state, world_size=1, directory=str(tmp_path / fmt))[0]
    ref, got = loaded["fully_reshardable"], loaded["dp_reshardable"]
    assert ref.keys() == got.keys() and len(ref) > 40
    for name, state in ref.items():
        assert state["step"] == got[name]["step"] == 3.0, name
        for key in ("param", "exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(got[name][key], state[key], err_msg=f"{name}.{key}")


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.pipeline_model_parallel_size=2"]], ids=["tp2", "pp2"])
def test_dp_reshardable_refuses_another_tp_or_pp_before_anything_is_written(tmp_path, layout):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.checkpoint import Checkpointer
    from casa_megatron.training.resume import ResumeMismatch, precheck

    run = tmp_path / "run"
    run_distributed(_train, world_size=2, run_dir=str(run), overrides=[DP_RESHARDABLE], steps=3)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [f"run_dir={run}", *layout])
    with pytest.raises(ResumeMismatch, match=r"optimizer_format=dp_reshardable, written at TP=1, PP=1; it resumes "
                                             r"at another data-parallel size but not at TP=[12], PP=[12]"):
        precheck(Checkpointer(run / "checkpoints"), cfg)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run}", *layout, "checkpoint.optimizer_format=fully_reshardable"])
    with pytest.raises(ResumeMismatch):  # the format of the checkpoint decides, not the run's
        precheck(Checkpointer(run / "checkpoints"), cfg)


def test_dp_reshardable_refuses_another_pipeline_split():
    """The LM layers per stage are part of the layout a dp_reshardable optimizer state is bound to:
    the same PP size with another split is refused as well, naming both splits; the same split passes."""
    from casa_megatron.config import load_config, to_dict
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.resume import ResumeMismatch, check_optimizer_layout

    def cfg(*overrides):
        return load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                           [DP_RESHARDABLE, "model.lm.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                            *overrides])

    saved = to_dict(cfg("parallel.num_layers_in_first_pipeline_stage=1"))
    check_optimizer_layout(saved, cfg("parallel.num_layers_in_first_pipeline_stage=1"), "ckpt")
    with pytest.raises(ResumeMismatch, match=r"written at TP=1, PP=2 \(LM layers per stage 1\+3\); it resumes at "
                                             r"another data-parallel size but not at TP=1, PP=2 \(LM layers per "
                                             r"stage 2\+2\)"):
        check_optimizer_layout(saved, cfg(), "ckpt")
    # the encoder over both stages moves parameters between them: another layout too
    split = to_dict(cfg("parallel.vision_blocks_per_pipeline_stage=[1,1]"))
    check_optimizer_layout(split, cfg("parallel.vision_blocks_per_pipeline_stage=[1,1]"), "ckpt")
    with pytest.raises(ResumeMismatch, match=r"written at TP=1, PP=2 \(LM layers per stage 0\+4, encoder blocks per "
                                             r"stage 1\+1\); .* not at TP=1, PP=2 \(LM layers per stage 2\+2\)"):
        check_optimizer_layout(split, cfg(), "ckpt")
    # virtual stages: each chunk has its own buffers, and rank 0 holds other layers
    chunked = to_dict(cfg("parallel.virtual_pipeline_model_parallel_size=2"))
    check_optimizer_layout(chunked, cfg("parallel.virtual_pipeline_model_parallel_size=2"), "ckpt")
    with pytest.raises(ResumeMismatch, match=r"written at TP=1, PP=2 \(LM layers per stage 2\+2\), 2 model chunks per "
                                             r"rank; .* not at TP=1, PP=2 \(LM layers per stage 2\+2\)\."):
        check_optimizer_layout(chunked, cfg(), "ckpt")

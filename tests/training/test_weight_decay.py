"""Weight decay and the optimizer's param groups (``training/optimizer.py``,
``training/param_groups_compat.py``, ``compat/param_group_matching.py``).

* Weight decay reaches weight matrices only: biases and 1-D parameters (norm scales, gates) are
  left alone, as in Megatron-LM. Before, our learning-rate override replaced megatron-core's
  default rule and a recipe with ``weight_decay: 0.05`` pulled every norm scale towards zero.
* A checkpoint saved with the older grouping (one group per learning rate) resumes: before, it
  did not load at all once the groups changed.
* The non-distributed optimizer resumes: before, megatron-core gave both of our learning-rate
  groups the parameters of one of them and every such resume failed.

One gloo process per run."""

from __future__ import annotations

import shutil

import pytest
from support.dist import run_distributed

TINY = "configs/tiny_cpu_synthetic.yaml"
PLAIN = "optimizer.use_distributed_optimizer=false"


def _decayed_step(rank, world, overrides):
    """One AdamW step with zero gradients: what moves is weight decay alone."""
    import torch

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(TrainConfig, TINY, ["optimizer.weight_decay=0.1", "optimizer.lr_new=0.01",
                                          "optimizer.lr_pretrained=0.02", "optimizer.warmup_steps=0",
                                          "model.lm.add_qkv_bias=true", *overrides])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    optimizer, scheduler = build_optimizer(ddp, cfg)
    scheduler.step(increment=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.main_grad.zero_()
    optimizer.step()
    params = {n: (tuple(p.shape), bool(getattr(p, "casa_new", False)), (p.detach() / before[n]).flatten().tolist()[:8],
                  bool(torch.equal(p.detach(), before[n])))
              for n, p in model.named_parameters()}
    groups = [g for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.optimizer.param_groups]
    return params, sorted({(g["eps"], g["betas"]) for g in groups})


@pytest.mark.parametrize("overrides", [[], [PLAIN]], ids=["distributed", "plain"])
def test_weight_decay_reaches_weight_matrices_only(overrides):
    (params, settings), = run_distributed(_decayed_step, world_size=1,
                                          overrides=[*overrides, "optimizer.adam_eps=1e-6", "optimizer.adam_beta2=0.98"])
    assert settings == [(1e-6, (0.9, 0.98))]  # every group takes the configured Adam settings
    biases = [n for n in params if n.endswith(".bias")]
    norms = [n for n, (shape, *_) in params.items() if len(shape) == 1 and not n.endswith(".bias")]
    assert biases and norms  # the test model has both
    for name, (shape, new, ratios, unchanged) in params.items():
        if len(shape) == 1 or name.endswith(".bias"):
            assert unchanged, name
        else:  # AdamW's decoupled decay: p *= 1 - lr * wd, at the parameter's own learning rate
            lr = 0.01 if new else 0.02
            assert ratios == pytest.approx([1 - lr * 0.1] * len(ratios), rel=1e-6), name


def _train(rank, world, run_dir, overrides, steps, older_grouping=False):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import optimizer
    from casa_megatron.training.loop import train

    if older_grouping:  # the optimizer as built before 2026-12-07: one param group per learning rate
        optimizer.get_standard_config_overrides = lambda config: {}
    # weight_decay=0: both groupings take the same steps. clip_grad=0: the updates do not depend
    # on the gradient norm, which sums the parameters in their groups' order (rounding differs).
    cfg = load_config(TrainConfig, TINY,
                      [f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "optimizer.warmup_steps=2",
                       "optimizer.wsd_decay_steps=0", "optimizer.clip_grad=0", "checkpoint.save_interval=3",
                       "tracking.enabled=false", *overrides])
    train(cfg)


def _losses(run_dir):
    import json

    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


CASES = {  # saved with the older grouping in each optimizer format, and the current one without
    "older_grouping-fully_reshardable": (True, []),
    "older_grouping-dp_reshardable": (True, ["checkpoint.optimizer_format=dp_reshardable"]),
    "older_grouping-plain_optimizer": (True, [PLAIN]),
    "plain_optimizer": (False, [PLAIN]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_repeats_the_uninterrupted_losses(tmp_path, case):
    older, overrides = CASES[case]
    run = tmp_path / "run"
    run_distributed(_train, world_size=1, run_dir=str(run), overrides=overrides, steps=6, older_grouping=older)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/iter_0000006")
    run_distributed(_train, world_size=1, run_dir=str(resumed), overrides=overrides, steps=6)
    assert _losses(resumed) == _losses(run)


def test_groups_sharing_a_key_keep_their_own_parameters():
    """megatron-core's matching handed one saved group to every running group with its key."""
    from casa_megatron.compat.param_group_matching import match_param_groups

    key = {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
    running = [{**key, "max_lr": 1e-5}, {**key, "max_lr": 1e-4}, {**key, "wd_mult": 0.0, "max_lr": 1e-5}]
    saved = [{**key, "max_lr": 1e-5, "params": [0, 1, 2]}, {**key, "wd_mult": 0.0, "params": [3]},
             {**key, "max_lr": 1e-4, "params": [4, 5]}]
    saved_in_running_order = [saved[0], saved[2], saved[1]]
    got = match_param_groups(running, saved_in_running_order)
    assert [g["params"] for g in got] == [[0, 1, 2], [4, 5], [3]]
    assert [g["max_lr"] for g in got[:2]] == [1e-5, 1e-4] and got[2]["wd_mult"] == 0.0
    assert got[0] is not got[1]
    with pytest.raises(ValueError, match="3 optimizer param groups, the running optimizer 2"):
        match_param_groups(running[:2], saved)

"""``training/memory_plan.py``: the planned bytes for weights, gradients and optimizer state per
rank equal what megatron actually holds after an optimizer step (two gloo ranks: DP=2, and TP=2),
in fp32 and in bf16, with and without the distributed optimizer, with a frozen LM."""

from __future__ import annotations

import pytest
from support.dist import run_distributed

LAYOUTS = {
    "dp2_bf16_distributed": ([], True),
    "dp2_fp32_distributed": (["precision.bf16=false"], True),
    "dp2_bf16_plain_adam": (["optimizer.use_distributed_optimizer=false"], True),
    "tp2_bf16_frozen_lm": (["parallel.tensor_model_parallel_size=2", "model.freeze_lm=true"], False),
    # the vocabulary tables train (a few rows): their whole gradient and Adam state are held
    "tp2_bf16_frozen_lm_token_rows": (["parallel.tensor_model_parallel_size=2", "model.freeze_lm=true",
                                       "model.trainable_tokens=[4,14]"], False),
}


def _held(rank, world, overrides):
    """(planned, held) bytes of (parameters, gradient buffers, optimizer state) on this rank,
    after one optimizer step (Adam's moments exist from then on)."""
    import torch

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.memory_plan import parameter_shapes, weight_memory
    from casa_megatron.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["precision.bf16=true", *overrides])
    initialize_parallel(cfg.parallel.tensor_model_parallel_size, 1, cfg.seed)
    dtype = torch.bfloat16 if cfg.precision.bf16 else torch.float32
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, dtype, cfg.precision)
    tp, dp = cfg.parallel.tensor_model_parallel_size, world // cfg.parallel.tensor_model_parallel_size
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    optimizer, _ = build_optimizer(ddp, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.main_grad.fill_(1e-3)
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(model.parameters())
    grads = nbytes(b.grad_data for b in ddp[0].buffers)
    state = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for values in opt.optimizer.state.values():
            state += [v for k, v in values.items() if torch.is_tensor(v) and v.numel() > 1]
        for groups in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            state += [t for group in getattr(opt, groups, []) for t in group]
    planned = weight_memory(parameter_shapes(model.named_parameters()), 1, dp, cfg.precision.bf16,  # this rank's (split) model
                            cfg.optimizer.use_distributed_optimizer)
    return {"planned": (planned.params, planned.grads, planned.optimizer), "held": (params, grads, nbytes(state)),
            "tp": tp, "dp": dp, "bf16": cfg.precision.bf16, "distributed": cfg.optimizer.use_distributed_optimizer}


def _tp1_shapes(rank, world, overrides):
    """The parameter shapes and TP tags of the same model built at TP=1 (what describe_model sees)."""
    import torch

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import ParallelConfig, TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.memory_plan import parameter_shapes

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["precision.bf16=true", *overrides])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, ParallelConfig(), cfg.data.image_seq_length, torch.bfloat16, cfg.precision)
    return list(parameter_shapes(model.named_parameters()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_planned_weight_memory_equals_what_megatron_holds(layout):
    from casa_megatron.training.memory_plan import weight_memory

    overrides, trains_lm = LAYOUTS[layout]
    reports = run_distributed(_held, world_size=2, overrides=overrides)
    for report in reports:
        (p_plan, g_plan, o_plan), (p_held, g_held, o_held) = report["planned"], report["held"]
        assert p_plan == p_held, report
        assert g_held >= g_plan and g_held - g_plan <= 4 * 2 * 128, report  # bucket padding to DP multiples
        assert o_plan == pytest.approx(o_held, rel=0.01, abs=64), report
        assert o_held > 0
    if reports[0]["tp"] > 1:  # describe_model's view: the TP=1 model's shapes, divided by their TP tags
        r = reports[0]
        shapes, = run_distributed(_tp1_shapes, world_size=1, overrides=overrides)
        plan = weight_memory(shapes, r["tp"], r["dp"], r["bf16"], r["distributed"])
        assert plan.params == r["held"][0] and plan.optimizer == pytest.approx(r["held"][2], rel=0.01, abs=64)
        assert plan.params < 0.75 * sum(n for _, n, _, _ in shapes) * 2  # most of the weights are split
    if not trains_lm:  # a frozen LM holds no gradient or optimizer state: fewer bytes than its weights say
        r = reports[0]
        assert r["planned"][1] < 4 * r["planned"][0] / 2


def test_describe_model_prints_the_plan_per_stage():
    """The tool (in a child process: it initialises megatron's parallel state) prints the plan
    per pipeline stage at the layout asked for."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "tools/describe_model.py", "configs/tiny_cpu_synthetic.yaml",
                           "parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                           "--gpus", "16"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "weights, gradients and optimizer state per GPU (TP=2, PP=2, DP=4" in out
    rows = [line.split() for line in out.splitlines()[-2:]]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[2] == "MiB" for r in rows)  # a tiny model
    bad = subprocess.run([sys.executable, "tools/describe_model.py", "configs/tiny_cpu_synthetic.yaml",
                          "parallel.tensor_model_parallel_size=2", "--gpus", "3"], cwd=repo, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "not a multiple of TP x PP = 2" in bad.stderr

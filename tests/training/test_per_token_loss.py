"""``calculate_per_token_loss`` (Megatron-LM's --calculate-per-token-loss): at DP=2 with two
micro-batches per rank whose answer-token counts differ 32-fold (1 vs 32), the gradients and the logged
loss equal those of one process computing the loss over all four micro-batches by hand -- the
sum over every answer token divided by their number, or (the default) the mean of the
micro-batches' token means."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from support.dist import run_distributed


def _batches(rank: int):
    """Two micro-batches of rank ``rank``: the first with one answer token, the second with all."""
    from support.vlm import random_batch

    one, full = random_batch(10 * rank), random_batch(10 * rank + 1)
    mask = torch.zeros_like(one.loss_mask)
    mask[0, 3] = 1.0
    return [dataclasses.replace(one, loss_mask=mask),
            dataclasses.replace(full, loss_mask=torch.ones_like(full.loss_mask))]


def _config(per_token: bool):
    from support.vlm import small_model_config

    from casa_megatron.config.schema import TrainConfig

    cfg = TrainConfig(model=small_model_config(), micro_batch_size=2, global_batch_size=8,
                      calculate_per_token_loss=per_token)
    cfg.optimizer.use_distributed_optimizer = False  # every rank holds the whole reduced gradient
    return cfg


def _megatron(rank, world, per_token):
    """The training path: megatron's schedule and gradient finalisation at DP=2."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from support.vlm import SEQ

    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.loop import _step_loss
    from casa_megatron.training.optimizer import wrap_ddp
    from casa_megatron.training.step import forward_step

    cfg = _config(per_token)
    initialize_parallel(1, 1, seed=0)
    model = build_vlm(cfg.model, cfg.parallel, image_seq_length=16)
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    ddp[0].zero_grad_buffer()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(_batches(rank)),
                                         model=ddp.chunks, num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return _step_loss(losses, per_token), grads


def _by_hand(rank, world):
    """One process, the four micro-batches of both ranks, both losses written out."""
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    cfg = _config(False)
    initialize_parallel(1, 1, seed=0)
    model = build_vlm(cfg.model, cfg.parallel, image_seq_length=16)
    batches = _batches(0) + _batches(1)
    out = {}
    for name in ("per_token", "mean_of_means"):
        model.zero_grad(set_to_none=True)
        sums = [(model(b) * b.loss_mask).sum() for b in batches]
        tokens = [b.loss_mask.sum() for b in batches]
        if name == "per_token":
            loss = torch.stack(sums).sum() / torch.stack(tokens).sum()
        else:
            loss = torch.stack([s / t for s, t in zip(sums, tokens)]).mean()
        loss.backward()
        out[name] = (loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


@pytest.fixture(scope="module")
def by_hand():
    return run_distributed(_by_hand, world_size=1)[0]


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "mean_of_micro_batch_means"])
def test_gradients_and_loss_equal_the_written_out_objective(by_hand, per_token):
    loss, grads = by_hand["per_token" if per_token else "mean_of_means"]
    other = by_hand["mean_of_means" if per_token else "per_token"][1]
    results = run_distributed(_megatron, world_size=2, per_token=per_token)
    # the two losses differ by 10x the tolerance below (at initialisation every token's loss is near log(vocab))
    assert abs(loss - by_hand["mean_of_means" if per_token else "per_token"][0]) > 1e-4 * abs(loss)
    for rank_loss, rank_grads in results:
        assert rank_loss == pytest.approx(loss, rel=1e-5)
        for name, ref in grads.items():
            np.testing.assert_allclose(rank_grads[name], ref, rtol=1e-4, atol=1e-7, err_msg=name)
    far = max(float(np.abs(results[0][1][n] - other[n]).max() / (np.abs(other[n]).max() + 1e-12)) for n in other)
    assert far > 0.05  # the other objective's gradients are not within the tolerance


def _pipeline(rank, world):
    """PP=2 (megatron broadcasts the token count from the last stage before scaling): every
    stage's gradients equal the per-token objective written out over the same micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from support.equivalence import TOL, build, global_name
    from support.vlm import IMAGE_SLOTS, SEQ, perturbed_full_state

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel.tp_layout import load_full_state
    from casa_megatron.training.optimizer import wrap_ddp
    from casa_megatron.training.step import forward_step

    batches = _batches(0)
    ref = build()
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    sums = [(ref(b) * b.loss_mask).sum() for b in batches]
    (torch.stack(sums).sum() / sum(b.loss_mask.sum() for b in batches)).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    stage = build(pp=2)
    to_global = {n: global_name(n, stage.decoder.layer_offset) for n, _ in stage.named_parameters()}
    load_full_state(stage, {n: full[g] for n, g in to_global.items()}, 0, 1)
    cfg = _config(True)
    cfg.parallel = ParallelConfig(pipeline_model_parallel_size=2)
    ddp = wrap_ddp(ModelChunks([stage]), cfg)
    ddp[0].zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp.chunks,
                                num_microbatches=2, seq_length=SEQ + IMAGE_SLOTS, micro_batch_size=2)
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.main_grad, ref_grads[to_global[name]], **TOL, msg=lambda m: f"{name}: {m}")
    return sorted(to_global.values())


def test_per_token_gradients_under_pipeline_parallelism():
    checked = run_distributed(_pipeline, world_size=2)
    assert any(n.startswith("vision.") for n in checked[0]) and any(n.startswith("output_layer") for n in checked[1])


def _tensor_parallel(rank, world, sp):
    """TP=2 (each TP rank computes the whole loss from the vocabulary-parallel logits and counts
    the same answer tokens): the gathered gradients equal the per-token objective written out."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from support.equivalence import TOL, build
    from support.vlm import IMAGE_SLOTS, SEQ, perturbed_full_state

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel.tp_layout import gather_full, load_full_state
    from casa_megatron.training.loop import _step_loss
    from casa_megatron.training.optimizer import wrap_ddp
    from casa_megatron.training.step import forward_step

    batches = _batches(0)
    ref = build()
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    sums = [(ref(b) * b.loss_mask).sum() for b in batches]
    ref_loss = torch.stack(sums).sum() / sum(b.loss_mask.sum() for b in batches)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = build(tp=2, sp=sp)
    load_full_state(model, full, parallel_state.get_tensor_model_parallel_rank(), 2)
    cfg = _config(True)
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp)
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    ddp[0].zero_grad_buffer()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp.chunks,
                                         num_microbatches=2, seq_length=SEQ + IMAGE_SLOTS, micro_batch_size=2)
    torch.testing.assert_close(torch.tensor(_step_loss(losses, True)), ref_loss.detach(), **TOL)
    grads = gather_full(model, {n: p.main_grad for n, p in model.named_parameters()},
                        parallel_state.get_tensor_model_parallel_group())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m: f"{name} (sp={sp}): {m}")
    return len(grads)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_per_token_gradients_under_tensor_parallelism(sp):
    counts = run_distributed(_tensor_parallel, world_size=2, sp=sp)
    assert counts[0] == counts[1] > 40

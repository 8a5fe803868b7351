"""The whole VLM under tensor and pipeline parallelism equals one process (CPU, gloo, 2 ranks).

Each layout loads the same full weights (split by megatron's own partition tags), runs the
same packed batches, and must reproduce the single-process loss, logits and gradients of every
parameter, the vision encoder included.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, SEQ, perturbed_full_state, random_batch, small_model_config

TOL = dict(rtol=2e-4, atol=2e-5)


def _build(tp: int, pp: int, sp: bool = False, **fusion):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(tp, pp, seed=0)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp)
    return build_vlm(small_model_config(**fusion), parallel, image_seq_length=IMAGE_SLOTS)


def _masked_loss(per_token, batch):
    return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()


def _finalize_sp_grads(model):
    """What megatron's finalize_model_grads does for sequence-parallel norm weights."""
    from megatron.core import parallel_state

    for p in model.parameters():
        if p.grad is not None and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def _tp_worker(rank, world, fusion):
    from megatron.core import parallel_state, tensor_parallel

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    batch, logits_batch = random_batch(1), random_batch(1, with_labels=False)
    ref = _build(1, 1, **fusion)
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_loss = _masked_loss(ref(batch), batch)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        ref_logits = ref(logits_batch)
    report = {}
    for sp in (False, True):
        model = _build(2, 1, sp=sp, **fusion)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        load_full_state(model, full, tp_rank, 2)
        loss = _masked_loss(model(batch), batch)
        loss.backward()
        _finalize_sp_grads(model)
        with torch.no_grad():
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(logits_batch))
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()},
                            parallel_state.get_tensor_model_parallel_group())
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m: f"{name} (sp={sp}): {m}")
        report[sp] = (loss.item(), max((grads[n] - ref_grads[n]).abs().max().item() for n in grads))
    assert all(g.abs().sum() > 0 for n, g in ref_grads.items() if "vision" in n or "casa" in n)
    return report


TP_VARIANTS = {
    "casa_parallel": {},
    "casa_shared_every_2": {"share_projections": True, "every_n": 2},
    "cross_attention_replace": {"mechanism": "cross_attention", "placement": "replace", "every_n": 2},
}


@pytest.mark.parametrize("variant", list(TP_VARIANTS))
def test_tensor_parallel_matches_single_process(variant):
    """TP=2 without and with sequence parallelism: loss, logits and every gradient."""
    reports = run_distributed(_tp_worker, world_size=2, fusion=TP_VARIANTS[variant])
    for sp, (loss, max_grad_err) in reports[0].items():
        assert max_grad_err < 1e-4, (sp, max_grad_err)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        loss = _masked_loss(per_token, batch)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def _run_schedule(model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=SEQ + IMAGE_SLOTS, micro_batch_size=2,
    )
    return [l["loss"] for l in losses]


def _pp_worker(rank, world, fusion):
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import load_full_state

    batches = [random_batch(seed) for seed in (11, 12, 13)]
    ref = _build(1, 1, **fusion)
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_losses = _run_schedule(ref, batches)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    stage = _build(1, 2, **fusion)
    offset = stage.decoder.layer_offset
    to_global = {n: _global_name(n, offset) for n, _ in stage.named_parameters()}
    load_full_state(stage, {n: full[g] for n, g in to_global.items()}, 0, 1)
    losses = _run_schedule(stage, batches)
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    checked = []
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[to_global[name]], **TOL,
                                   msg=lambda m: f"{name}: {m}")
        checked.append(to_global[name])
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "checked": checked,
            "vision_grad_norm": sum(p.grad.norm().item() for n, p in stage.named_parameters() if n.startswith("vision"))}


def _global_name(name: str, offset: int) -> str:
    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + offset)
        return ".".join(parts)
    return name


PP_VARIANTS = {"casa_parallel": ({}, 3), "casa_before_layers_1_2": ({"placement": "before", "layers": [1, 2]}, 2)}


@pytest.mark.parametrize("variant", list(PP_VARIANTS))
def test_pipeline_parallel_matches_single_process(variant):
    """PP=2 through megatron's 1F1B schedule, 3 micro-batches: losses and all gradients,
    including the vision encoder's, which receives gradient from CASA layers on both stages."""
    fusion, casa_layer_on_stage_1 = PP_VARIANTS[variant]
    reports = run_distributed(_pp_worker, world_size=2, fusion=fusion)
    checked = set(reports[0]["checked"]) | set(reports[1]["checked"])
    assert any(n.startswith("vision.") for n in reports[0]["checked"])
    assert any(n.startswith(f"decoder.layers.{casa_layer_on_stage_1}.casa_attention")
               for n in reports[1]["checked"])
    assert reports[0]["vision_grad_norm"] > 0
    assert len(checked) == len(reports[0]["checked"]) + len(reports[1]["checked"])

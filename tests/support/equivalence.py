"""Layout equivalence workers shared by the model tests: a model at TP=2 (with and without
sequence parallelism) or PP=2 must reproduce one process's loss, logits and every gradient.

The one-process reference runs the *reference paths* (``build(reference=True)``): self-attention
with the dense block-causal mask and image tokens through the whole fused QKV. Every other model
runs the fast paths (cu_seqlens per packed sample, K/V-only image projection), at TP=1 too, so
each worker also proves fast == reference in the same processes.

Each layout loads the same full weights (split by megatron's own partition tags) and runs the
same packed batches; run them with ``support.dist.run_distributed(worker, world_size=2, fusion=...)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from support.vlm import IMAGE_SLOTS, SEQ, perturbed_full_state, random_batch, small_model_config

TOL = dict(rtol=2e-4, atol=2e-5)


def build(tp: int = 1, pp: int = 1, sp: bool = False, vision=None, reference: bool = False, recompute=None,
          split=(None, None), vision_split=None, model=None, vp=None, **fusion):
    """``reference``: the dense-mask self-attention and the fused image QKV (the old paths);
    ``recompute``: RecomputeConfig fields for the layouts under test (the reference keeps its
    activations); ``split``: LM layers on the first and last pipeline stage (None: even);
    ``vision_split``: encoder blocks per stage (``parallel.vision_blocks_per_pipeline_stage``);
    ``model``: ModelConfig fields to set (``freeze_lm``, ``lora``); ``vp``: model chunks per rank
    (the interleaved schedule; returns this rank's ``ModelChunks``)."""
    from casa_megatron.config.schema import RecomputeConfig
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_model_chunks, build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(tp, pp, seed=0, virtual_pipeline_model_parallel_size=vp)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp, num_layers_in_first_pipeline_stage=split[0],
                              num_layers_in_last_pipeline_stage=split[1],
                              vision_blocks_per_pipeline_stage=vision_split, virtual_pipeline_model_parallel_size=vp)
    config = small_model_config(vision, **fusion, image_kv_only=not reference)
    for key, value in (model or {}).items():
        if key == "lm":  # LanguageModelConfig fields to change
            value = dataclasses.replace(config.lm, **value)
        setattr(config, key, value)
    config.packed_attention = not reference
    if recompute and not reference:
        config.recompute = RecomputeConfig(**recompute)
    if vp:
        return build_model_chunks(config, parallel, image_seq_length=IMAGE_SLOTS)
    return build_vlm(config, parallel, image_seq_length=IMAGE_SLOTS)


def masked_loss(per_token, batch):
    return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()


def finalize_sp_grads(model):
    """What megatron's finalize_model_grads does for sequence-parallel (norm, gate) weights, and
    for per-head q/k norms (``qk_layernorm``: each TP rank's gradient covers its heads only)."""
    from megatron.core import parallel_state

    qk_layernorm = getattr(getattr(model, "config", None), "qk_layernorm", False)
    for name, p in model.named_parameters():
        if p.grad is not None and (getattr(p, "sequence_parallel", False) or (
                qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name))):
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def _temporal(vision) -> int:
    return (vision or {}).get("temporal_patch_size", 1)


def _grads(model) -> dict:
    """Gradients of the trained parameters (a frozen LM has none)."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def tp_worker(rank, world, fusion, vision=None, recompute=None, model_fields=None):
    from megatron.core import parallel_state, tensor_parallel

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    t = _temporal(vision)
    batch, logits_batch = random_batch(1, temporal=t), random_batch(1, with_labels=False, temporal=t)
    ref = build(vision=vision, reference=True, model=model_fields, **fusion)
    full = perturbed_full_state(ref)  # also moves gates (and LoRA's B) away from 0
    load_full_state(ref, full, 0, 1)
    ref_loss = masked_loss(ref(batch), batch)
    ref_loss.backward()
    ref_grads = {n: g.clone() for n, g in _grads(ref).items()}
    with torch.no_grad():
        ref_logits = ref(logits_batch)
    report = {"max_grad_err": {}, "gate_grads": [ref_grads[n].item() for n in ref_grads if n.endswith("casa_gate")],
              "trained": sorted(ref_grads)}
    for tp, sp in ((1, False), (2, False), (2, True)):
        model = build(tp=tp, sp=sp, vision=vision, recompute=recompute, model=model_fields, **fusion)
        load_full_state(model, full, parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0, tp)
        loss = masked_loss(model(batch), batch)
        loss.backward()
        finalize_sp_grads(model)
        with torch.no_grad():
            logits = model(logits_batch)
            if tp > 1:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        grads = _grads(model)
        if tp > 1:
            grads = gather_full(model, grads, parallel_state.get_tensor_model_parallel_group())
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m: f"{name} (tp={tp}, sp={sp}): {m}")
        report["max_grad_err"][(tp, sp)] = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert all(g.abs().sum() > 0 for n, g in ref_grads.items()
               if n.startswith(("vision.", "projector.")) or ".casa_attention." in n)
    return report


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        loss = masked_loss(per_token, batch)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def run_schedule(model, batches):
    """megatron's schedule over ``batches``: 1F1B for one module, interleaved for ``ModelChunks``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.training.step import data_for_chunks

    chunks = model.chunks if isinstance(model, ModelChunks) else [model]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_for_chunks(iter(batches), len(chunks)), model=chunks,
        num_microbatches=len(batches), seq_length=SEQ + IMAGE_SLOTS, micro_batch_size=2,
    )
    return [l["loss"] for l in losses]


def global_name(name: str, offset: int, vision_offset: int = 0) -> str:
    """Stage-local parameter name -> the one-process model's name (decoder layers and, with the
    encoder over several stages, its blocks shift)."""
    for prefix, shift in (("decoder.layers.", offset), ("vision.blocks.", vision_offset)):
        if name.startswith(prefix):
            parts = name.split(".")
            parts[2] = str(int(parts[2]) + shift)
            return ".".join(parts)
    return name


def stage_global_names(stage) -> dict:
    vision_offset = stage.vision.block_offset if hasattr(stage, "vision") else 0
    return {n: global_name(n, stage.decoder.layer_offset, vision_offset) for n, _ in stage.named_parameters()}


def pp_worker(rank, world, fusion, vision=None, recompute=None, split=(None, None), vision_split=None,
              text_only=(), model_fields=None):
    """``text_only``: indices of micro-batches whose images are dropped."""
    from megatron.core import parallel_state
    from support.vlm import without_images

    from casa_megatron.parallel.tp_layout import load_full_state

    batches = [random_batch(seed, temporal=_temporal(vision)) for seed in (11, 12, 13)]
    batches = [without_images(b) if i in text_only else b for i, b in enumerate(batches)]
    ref = build(vision=vision, reference=True, model=model_fields, **fusion)
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_losses = run_schedule(ref, batches)
    ref_grads = {n: g.clone() for n, g in _grads(ref).items()}

    stage = build(pp=2, vision=vision, recompute=recompute, split=split, vision_split=vision_split,
                  model=model_fields, **fusion)
    to_global = stage_global_names(stage)
    load_full_state(stage, {n: full[g] for n, g in to_global.items()}, 0, 1)
    losses = run_schedule(stage, batches)
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    for name, grad in _grads(stage).items():
        torch.testing.assert_close(grad, ref_grads[to_global[name]], **TOL, msg=lambda m: f"{name}: {m}")
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(),
            "checked": sorted(to_global.values()), "layers": len(stage.decoder.layers),
            "vision_grad_norm": sum(g.norm().item() for n, g in _grads(stage).items() if n.startswith("vision."))}


def tp_pp_worker(rank, world, fusion, vision=None, vision_split=None, sp=True, model_fields=None):
    """4 ranks: TP=2 (+SP) x PP=2 through megatron's 1F1B schedule against one process: losses
    and every gradient (gathered over TP, the sequence-parallel ones summed first)."""
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    batches = [random_batch(seed, temporal=_temporal(vision)) for seed in (21, 22, 23)]
    ref = build(vision=vision, reference=True, model=model_fields, **fusion)
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_losses = run_schedule(ref, batches)
    ref_grads = {n: g.clone() for n, g in _grads(ref).items()}

    stage = build(tp=2, pp=2, sp=sp, vision=vision, vision_split=vision_split, model=model_fields, **fusion)
    to_global = stage_global_names(stage)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    load_full_state(stage, {n: full[g] for n, g in to_global.items()}, tp_rank, 2)
    losses = run_schedule(stage, batches)
    finalize_sp_grads(stage)
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    grads = gather_full(stage, _grads(stage), parallel_state.get_tensor_model_parallel_group())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[to_global[name]], **TOL, msg=lambda m: f"{name}: {m}")
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "checked": sorted(to_global.values())}


def vpp_worker(rank, world, fusion, vision=None, model_fields=None, recompute=None, micro_batches=4,
               split=(None, None)):
    """PP=2 with two model chunks per rank (the interleaved schedule, 4 LM layers: one per virtual
    stage, rank 0 holding layers 0 and 2 and the encoder) against one process: losses and every
    gradient. 4 ranks: TP=2 with sequence parallelism as well (gradients gathered over TP, the
    sequence-parallel ones summed first). ``split``: LM layers on the first and last stage (each
    cut into the rank's two chunks; ``model_fields`` then gives the LM more layers)."""
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    tp = world // 2
    batches = [random_batch(seed, temporal=_temporal(vision)) for seed in range(31, 31 + micro_batches)]
    ref = build(vision=vision, reference=True, model=model_fields, **fusion)
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_losses = run_schedule(ref, batches)
    ref_grads = {n: g.clone() for n, g in _grads(ref).items()}

    chunks = build(tp=tp, pp=2, vp=2, sp=tp > 1, vision=vision, model=model_fields, recompute=recompute, split=split,
                   **fusion)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    checked, layers = [], []
    for chunk in chunks:
        to_global = stage_global_names(chunk)
        load_full_state(chunk, {n: full[g] for n, g in to_global.items()}, tp_rank, tp)
        layers.append(chunk.decoder.layer_offset)
    losses = run_schedule(chunks, batches)
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    for chunk in chunks:
        to_global = stage_global_names(chunk)
        finalize_sp_grads(chunk)
        grads = gather_full(chunk, _grads(chunk), parallel_state.get_tensor_model_parallel_group())
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[to_global[name]], **TOL, msg=lambda m: f"{to_global[name]}: {m}")
            checked.append(to_global[name])
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "checked": sorted(checked),
            "first_layers": layers, "trained": sorted(ref_grads)}

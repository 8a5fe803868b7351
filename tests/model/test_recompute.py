"""Activation recomputation (``model.recompute``): the same loss and every gradient as keeping
the activations, for every fusion and method, for the vision encoder's blocks too
(``model.vision.recompute``), with a frozen LM too (the case megatron's reentrant
checkpoint would silently leave without CASA gradients); far less kept for backward. Layouts
TP=2+SP and PP=2 with recomputation: tests/model/test_vlm_parallel.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, QWEN_VISION, perturbed_full_state, random_batch, small_model_config

from casa_megatron.config.schema import ConfigError, LoRAConfig, RecomputeConfig

FULL = {"uniform_1": RecomputeConfig("full", "uniform", 1), "uniform_3": RecomputeConfig("full", "uniform", 3),
        "block_2": RecomputeConfig("full", "block", 2)}
SELECTIVE = {"core_attn": RecomputeConfig("selective", modules=["core_attn"]),
             "mlp": RecomputeConfig("selective", modules=["mlp"]),
             "core_attn_mlp": RecomputeConfig("selective", modules=["core_attn", "mlp"])}
METHODS = {**FULL, **SELECTIVE}


def test_chunks_cover_the_stage_in_order():
    from casa_megatron.model.recompute import chunks

    assert chunks(4, RecomputeConfig()) == [(0, 4, False)]
    assert chunks(4, FULL["uniform_1"]) == [(0, 1, True), (1, 2, True), (2, 3, True), (3, 4, True)]
    assert chunks(4, FULL["uniform_3"]) == [(0, 3, True), (3, 4, True)]
    assert chunks(4, FULL["block_2"]) == [(0, 1, True), (1, 2, True), (2, 4, False)]
    assert chunks(2, RecomputeConfig("full", "block", 5)) == [(0, 1, True), (1, 2, True)]
    assert chunks(0, FULL["uniform_1"]) == []


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (a checkpointed chunk
    keeps its own in place of the outer hooks', so they do not count: they are dropped)."""
    total = [0]
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def _compare(rank, world, variants):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from casa_megatron.training.step import masked_mean

    report = {}
    for name, (model_kw, fusion) in variants.items():
        temporal = (model_kw.get("vision_fields") or {}).get("temporal_patch_size", 1)
        batches = [random_batch(5, temporal=temporal), random_batch(6, temporal=temporal)]
        initialize_parallel(1, 1, seed=0)
        model_kw = dict(model_kw)
        vision_too = model_kw.pop("vision_too", False)  # the encoder's blocks recomputed as well
        base = small_model_config(model_kw.pop("vision_fields", None), **fusion)
        base = dataclasses.replace(base, **model_kw)
        full = None
        results = {}
        for method, recompute in {"none": RecomputeConfig(), **METHODS}.items():
            vision = dataclasses.replace(base.vision, recompute=recompute) if vision_too else base.vision
            model = build_vlm(dataclasses.replace(base, recompute=recompute, vision=vision), ParallelConfig(),
                              image_seq_length=IMAGE_SLOTS)
            full = full or perturbed_full_state(model)
            load_full_state(model, full, 0, 1)
            losses, kept = [], 0
            for batch in batches:
                def step():
                    loss = masked_mean(model(batch), batch)
                    losses.append(loss.detach())
                    loss.backward()
                kept = max(kept, _saved_bytes(step))
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[method] = (torch.stack(losses), grads, kept)
        ref_losses, ref_grads, ref_kept = results["none"]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(ref_grads) == trainable and all(ref_grads[n].abs().sum() > 0 for n in ref_grads), name
        for method in METHODS:
            losses, grads, kept = results[method]
            torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-7)
            assert grads.keys() == ref_grads.keys(), (name, method, set(ref_grads) ^ set(grads))
            for n in grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{name} / {method} / {n}: {m}")
        report[name] = {m: results[m][2] for m in results} | {"trainable": len(trainable)}
    return report


VARIANTS = {
    "casa": ({}, {}),
    "cross_attention_gated": ({}, {"mechanism": "cross_attention", "cross_attention_gate": True}),
    "insertion": ({}, {"mechanism": "insertion"}),
    # only the CASA layers train: the decoder's input and the image states need no grad
    "casa_only_trainable": ({"freeze_lm": True}, {}),
    # LoRA on a frozen LM's MLP and attention: nothing entering a recomputed MLP needs grad but its
    # adapters do (megatron's reentrant checkpoint would skip their backward)
    "casa_frozen_lm_lora": ({"freeze_lm": True, "lora": LoRAConfig(rank=2)}, {}),
    # model.vision.recompute too: the Qwen2.5-VL encoder's window / full-attention blocks
    "casa_qwen_encoder": ({"vision_fields": QWEN_VISION, "vision_too": True}, {}),
}


def test_recompute_equals_keeping_activations_and_keeps_less():
    report, = run_distributed(_compare, world_size=1, variants=VARIANTS)
    for name, kept in report.items():
        # every layer recomputed: what backward keeps of the decoder drops to its chunk inputs
        assert kept["uniform_1"] < 0.6 * kept["none"], (name, kept)
        assert kept["uniform_3"] < kept["block_2"] < kept["none"], (name, kept)
        # selective: each module's insides dropped, the rest of every layer kept
        assert kept["core_attn_mlp"] < min(kept["core_attn"], kept["mlp"]), (name, kept)
        assert max(kept["core_attn"], kept["mlp"]) < kept["none"], (name, kept)
        assert kept["uniform_1"] < kept["core_attn_mlp"], (name, kept)
    assert report["casa_only_trainable"]["trainable"] < report["casa"]["trainable"]
    assert report["casa_qwen_encoder"]["uniform_1"] < 0.5 * report["casa_qwen_encoder"]["none"]


def test_casa_only_training_freezes_vision_too():
    """The hardest case for a reentrant checkpoint: nothing entering the decoder needs grad."""
    variants = {"casa_only": ({"freeze_lm": True, "vision": dataclasses.replace(
        small_model_config().vision, trainable_blocks=0, projector_trainable=False)}, {})}
    report, = run_distributed(_compare, world_size=1, variants=variants)
    assert report["casa_only"]["trainable"] > 0


def test_bad_recompute_configs_are_named():
    from casa_megatron.config.limits import check_limits
    from casa_megatron.config.schema import TrainConfig

    with pytest.raises(ConfigError, match="model.recompute.granularity='partial' not in"):
        RecomputeConfig("partial").validate()
    with pytest.raises(ConfigError, match=r"model.recompute.modules=\['layernorm'\]: selective recomputation takes"):
        RecomputeConfig("selective", modules=["layernorm"]).validate()
    with pytest.raises(ConfigError, match=r"modules=\[\]"):
        RecomputeConfig("selective", modules=[]).validate()
    with pytest.raises(ConfigError, match="model.recompute.method='blocks' not in"):
        RecomputeConfig("full", "blocks").validate()
    cfg = TrainConfig()
    cfg.model.recompute = RecomputeConfig("full", "uniform", 0)
    with pytest.raises(ConfigError, match=r"model.recompute.num_layers=0: must be >= 1"):
        check_limits(cfg)
    cfg.model.recompute.num_layers = 1
    cfg.precision.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="recompute.granularity='full' with precision.fp8='hybrid' is not supported"):
        cfg.validate()


def test_dropout_is_refused_rather_than_recomputed_with_another_mask():
    from casa_megatron.model.recompute import run_layers

    from types import SimpleNamespace

    layers = [torch.nn.Linear(2, 2)]
    config = SimpleNamespace(hidden_dropout=0.0, attention_dropout=0.1)  # a TransformerConfig's rates
    with pytest.raises(ValueError, match="dropout 0.1"):
        run_layers(layers, torch.zeros(1, 2), lambda layer, h: layer(h), FULL["uniform_1"], config)
    out = run_layers(layers, torch.ones(1, 2), lambda layer, h: layer(h), RecomputeConfig(), config)
    torch.testing.assert_close(out, layers[0](torch.ones(1, 2)))


def test_recompute_may_change_on_resume():
    from casa_megatron.training.resume import MAY_CHANGE, MUST_MATCH, classify

    assert classify("model.recompute.granularity") == MAY_CHANGE
    assert classify("model.recompute.num_layers") == MAY_CHANGE
    assert classify("model.lm.num_layers") == MUST_MATCH


def _bf16(rank, world):
    """CASA with the Qwen encoder in bf16 (the GPU dtype), every LM and encoder block recomputed
    (full), or their attention kernels and MLPs (selective)."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from casa_megatron.training.step import masked_mean

    initialize_parallel(1, 1, seed=0)
    batch = random_batch(5, temporal=2)
    base = small_model_config(QWEN_VISION)
    out, full = {}, None
    for name, recompute in (("none", RecomputeConfig()), ("full", FULL["uniform_1"]),
                            ("selective", SELECTIVE["core_attn_mlp"])):
        cfg = dataclasses.replace(base, recompute=recompute, vision=dataclasses.replace(base.vision, recompute=recompute))
        model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS, params_dtype=torch.bfloat16)
        full = full or {n: t.to(torch.bfloat16) for n, t in perturbed_full_state(model).items()}
        load_full_state(model, full, 0, 1)
        losses = []

        def step():
            losses.append(masked_mean(model(batch), batch))
            losses[-1].backward()
        kept = _saved_bytes(step)
        out[name] = (losses[0].detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}, kept)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loss_a, grads_a, kept_a = out["none"]
    assert all(g.abs().sum() > 0 for g in grads_a.values())
    for name, share in (("full", 0.5), ("selective", 0.9)):
        loss_b, grads_b, kept_b = out[name]
        assert kept_b < share * kept_a, (name, kept_a, kept_b)  # recomputation really ran
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)  # the same bf16 kernels run again
        assert grads_a.keys() == grads_b.keys()
        for n in grads_a:
            torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=0, msg=lambda m: f"{name} {n}: {m}")
    return float(loss_a)


def test_recompute_in_bf16_equals_keeping_activations_exactly():
    loss, = run_distributed(_bf16, world_size=1)
    assert loss > 0

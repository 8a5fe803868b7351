"""The Flamingo/mllama tanh gate on fusion layers (``model.fusion.cross_attention_gate``).

At initialisation (alpha = 0) a gated model is exactly its backbone with the fusion layers
removed, yet alpha receives a gradient; once alpha moves the images matter. Under TP (+SP) the
replicated alpha gets the same gradient as in one process.
"""

from __future__ import annotations


import pytest
import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, perturbed_full_state, random_batch, small_model_config

TOL = dict(rtol=2e-4, atol=2e-5)
GATED = {"mechanism": "cross_attention", "cross_attention_gate": True}


def _build(tp: int = 1, sp: bool = False, **fusion):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(tp, 1, seed=0)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    return build_vlm(small_model_config(**fusion), parallel, image_seq_length=IMAGE_SLOTS)


def _backbone_only():
    """The same CASAVLM class with no fusion layer at all (every layer a plain megatron layer)."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.transformer_config import (
        lm_transformer_config, projector_transformer_config, vision_transformer_config)
    from casa_megatron.model.vlm import CASAVLM

    cfg = small_model_config(mechanism="insertion")
    lm = lm_transformer_config(cfg, ParallelConfig())
    return CASAVLM(cfg, lm, vision_transformer_config(cfg, ParallelConfig()),
                   projector_transformer_config(lm), IMAGE_SLOTS)


def _masked_loss(per_token, batch):
    return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()


def _init_checks(rank, world):
    from casa_megatron.parallel.tp_layout import load_full_state

    batch = random_batch(5)
    gated = _build(**GATED)
    full = {n: v for n, v in perturbed_full_state(gated).items() if not n.endswith("casa_gate")}
    for name, p in gated.named_parameters():
        if not name.endswith("casa_gate"):
            p.data.copy_(full[name])
    backbone = _backbone_only()
    load_full_state(backbone, {n: full[n] for n, _ in backbone.named_parameters()}, 0, 1)
    ungated = _build(mechanism="cross_attention")
    load_full_state(ungated, full, 0, 1)

    loss = _masked_loss(gated(batch), batch)
    loss.backward()
    with torch.no_grad():
        backbone_loss = _masked_loss(backbone(batch), batch)
        ungated_loss = _masked_loss(ungated(batch), batch)
        for layer in gated.casa_layers():
            layer.casa_gate.fill_(0.5)
        opened_loss = _masked_loss(gated(batch), batch)
    gates = {n: p for n, p in gated.named_parameters() if n.endswith("casa_gate")}
    casa_weights = [p for n, p in gated.named_parameters() if ".casa_attention." in n]
    return {
        "loss": loss.item(), "backbone": backbone_loss.item(), "ungated": ungated_loss.item(),
        "opened": opened_loss.item(), "n_layers": len(gated.casa_layers()),
        "gate_grads": [p.grad.abs().item() for p in gates.values()],
        "gates_new": all(p.casa_new and p.requires_grad for p in gates.values()),
        "gates_in_casa_parameters": all(any(q is p for q in l.casa_parameters())
                                        for l, p in zip(gated.casa_layers(), gates.values())),
        "casa_weight_grad": max(p.grad.abs().max().item() for p in casa_weights),
    }


def test_gate_closed_at_init_equals_backbone_and_alpha_learns():
    r = run_distributed(_init_checks, world_size=1)[0]
    assert r["n_layers"] == 4 and len(r["gate_grads"]) == 4
    assert r["loss"] == pytest.approx(r["backbone"], abs=1e-6)
    assert abs(r["ungated"] - r["backbone"]) > 1e-4  # without the gate cross-attention contributes
    assert abs(r["opened"] - r["backbone"]) > 1e-4  # an open gate lets the images in
    assert all(g > 0 for g in r["gate_grads"])  # d tanh / d alpha = 1 at 0
    assert r["casa_weight_grad"] == 0.0  # tanh(0) = 0 blocks them until alpha moves (Flamingo)
    assert r["gates_new"] and r["gates_in_casa_parameters"]


def _replace_rejected(rank, world):
    try:
        _build(**GATED, placement="replace")
    except ValueError as exc:
        return str(exc)
    return None


def test_gate_with_replace_placement_is_refused():
    message = run_distributed(_replace_rejected, world_size=1)[0]
    assert message and "replace" in message


# TP=2 (+SP) equivalence of the gated model: tests/model/test_vlm_parallel.py ('cross_attention_gated').

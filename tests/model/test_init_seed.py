"""Initial weights do not depend on the layout (model/init_seed.py): from the same seed, every
TP / PP layout and uneven pipeline split draws the same full weights, the LM layers are the same in
every fusion, and building a component leaves the random stream outside it as it was."""

from __future__ import annotations

import torch
from support.dist import run_distributed
from support.equivalence import build, stage_global_names

# (tp, pp, split, encoder split): the layouts a 4-layer LM and 2-block encoder can take on 2 ranks
LAYOUTS = [(2, 1, (None, None), None), (1, 2, (None, None), None), (1, 2, (1, None), None),
           (1, 2, (None, 1), None), (1, 2, (None, None), [1, 1])]


def _full_weights(model, tp: int):
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import gather_full

    local = {n: p.detach() for n, p in model.named_parameters()}
    if tp > 1:
        local = gather_full(model, local, parallel_state.get_tensor_model_parallel_group())
    return {stage_global_names(model)[n]: w for n, w in local.items()}


def _layout_worker(rank, world):
    reference = {n: p.detach().clone() for n, p in build().named_parameters()}  # one process, PP=1
    checked = {}
    for tp, pp, split, vision_split in LAYOUTS:
        weights = _full_weights(build(tp=tp, pp=pp, split=split, vision_split=vision_split), tp)
        assert weights, (tp, pp, split)
        for name, w in weights.items():
            torch.testing.assert_close(w, reference[name], rtol=0, atol=0,
                                       msg=lambda m: f"{name} at TP={tp} PP={pp} split={split} {vision_split}: {m}")
        checked[f"tp{tp}-pp{pp}-{split}" + (f"-vision{vision_split}" if vision_split else "")] = sorted(weights)
    return checked


def test_every_layout_and_split_draws_the_same_full_weights():
    first, second = run_distributed(_layout_worker, world_size=2)
    for layout in first:
        names = set(first[layout]) | set(second[layout])
        assert any(n.startswith("vision.") for n in names) and any(n.startswith("decoder.layers.3.") for n in names)
    # the uneven splits really moved layers between the stages
    assert sum(n.startswith("decoder.layers.") and n.endswith("self_attention.linear_qkv.weight")
               for n in first["tp1-pp2-(1, None)"]) == 1
    assert sum(n.startswith("decoder.layers.") and n.endswith("self_attention.linear_qkv.weight")
               for n in second["tp1-pp2-(None, 1)"]) == 1
    # and the encoder split put block 1 (and the final norm) on the second stage
    split = "tp1-pp2-(None, None)-vision[1, 1]"
    assert any(n.startswith("vision.blocks.1.") for n in second[split])
    assert any(n.startswith("vision.final_layernorm.") for n in second[split])
    assert not any(n.startswith("vision.blocks.1.") for n in first[split])


def _fusion_worker(rank, world):
    casa = dict(build(every_n=2).named_parameters())  # CASA in layers 0 and 2
    insertion = dict(build(mechanism="insertion").named_parameters())
    shared = [n for n in insertion if n in casa]
    for name in shared:
        torch.testing.assert_close(casa[name], insertion[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    return shared


def test_every_fusion_starts_from_the_same_language_model():
    """A plain LM layer after a CASA layer, the embedding, encoder, projector and output layer are
    identical in a CASA and an insertion model built from the same seed, and so are the CASA
    layers' own self-attention and MLP (the CASA weights draw from a seed of their own)."""
    shared = run_distributed(_fusion_worker, world_size=1)[0]
    for part in ("embedding.", "vision.", "projector.", "output_layer.", "decoder.layers.1.", "decoder.layers.3."):
        assert any(n.startswith(part) for n in shared), part


def _restore_worker(rank, world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from casa_megatron.model.init_seed import component_seed

    build()  # parallel state and RNG tracker as a run has them
    tracker = get_cuda_rng_tracker()
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    cpu = torch.get_rng_state()
    with component_seed(7, "lm.layers.0") as seed:
        inside = torch.rand(4)
    with component_seed(7, "lm.layers.0"):
        again = torch.rand(4)
    with component_seed(7, "lm.layers.1"):
        other = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert tracker.get_states().keys() == states.keys()
    assert all(torch.equal(tracker.get_states()[k], v) for k, v in states.items())
    assert torch.equal(inside, again) and not torch.equal(inside, other)
    return seed


def test_component_seed_is_reproducible_and_restores_the_random_state():
    assert run_distributed(_restore_worker, world_size=1)[0] > 0

"""LoRA adapters on the frozen LM and encoder (model/lora.py, ``model.lora``, ``model.vision.lora``).

* At initialisation (``B = 0``) the model is the model without adapters, to the bit; only the
  adapters (and CASA, the encoder, the projector) train; a ``replace`` layer has no
  self-attention to adapt.
* Merged into the weights (what ``export-hf`` writes) the model computes what the adapters did.
* Dropout acts in training only.
* TP=2 with and without sequence parallelism (layers kept or recomputed), and PP=2, reproduce one process's loss, logits and
  every trained gradient (adapters non-zero; ``support.equivalence``).
* Initial adapters are the same full tensors at TP=1 and TP=2; a TP=2 save loads at TP=1
  (``A`` and ``B`` cut as their base linear, fc1's ``B`` in the SwiGLU layout).
* Weights-only loading: an import without adapters keeps them at ``B = 0``; adapters the model
  has no place for are refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.equivalence import pp_worker, tp_worker
from support.vlm import IMAGE_SLOTS, perturbed_full_state, random_batch, small_model_config

from casa_megatron.config import LoRAConfig

LORA = LoRAConfig(rank=4, alpha=8.0)


VISION_LORA = LoRAConfig(rank=2, alpha=4.0, targets=["linear_qkv", "linear_fc1", "linear_fc2"])


def _config(lora=LORA, vision_lora=None, **fusion):
    vision = {"trainable_blocks": 0, "lora": vision_lora} if vision_lora else None
    return dataclasses.replace(small_model_config(vision, **fusion), freeze_lm=True, lora=lora)


def _build(cfg, tp=1):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(tp, 1, seed=0)
    return build_vlm(cfg, ParallelConfig(tensor_model_parallel_size=tp), IMAGE_SLOTS)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)


def _refusal(model, folder):
    """The message of the CheckpointError a weights-only load of ``folder`` raises, or None."""
    from casa_megatron.training.checkpoint import CheckpointError
    from casa_megatron.training.pretrained import load_model_weights

    try:
        load_model_weights(model, folder)
    except CheckpointError as exc:
        return str(exc)
    return None


def _single_process(rank, world, tmp):
    from casa_megatron.model.lora import lora_adapters, merge_lora
    from casa_megatron.training.pretrained import load_model_weights, save_model_weights

    batch = random_batch(1, with_labels=False)
    report = {}
    base = _build(_config(lora=LoRAConfig(), vision_lora=LoRAConfig()))
    model = _build(_config(vision_lora=VISION_LORA))
    report["zero_b_equal"] = torch.equal(_logits(base, batch), _logits(model, batch))
    names = [n for n, _ in lora_adapters(model)]
    report["adapters"] = len(names)
    report["trained_lm"] = sorted(n for n, p in model.named_parameters() if p.requires_grad
                                  and n.startswith("decoder.") and ".casa_" not in n and "_lora." not in n)
    report["adapters_trained_new"] = all(p.requires_grad and p.casa_new for _, a in lora_adapters(model)
                                         for p in a.parameters())
    report["trained_vision"] = sorted(n for n, p in model.named_parameters() if p.requires_grad
                                      and n.startswith("vision.") and "_lora." not in n)
    replace = _build(_config(placement="replace", every_n=2))
    report["replace_adapters"] = sorted(n for n, _ in lora_adapters(replace))

    # merged == adapters (A and B perturbed so the adapters do something; the rest as built)
    full = {n: t for n, t in perturbed_full_state(model).items() if "_lora." in n}
    model.load_state_dict(full, strict=False)
    adapted = _logits(model, batch)
    report["adapters_change_logits"] = (adapted - _logits(base, batch)).abs().max().item()
    save_model_weights(model, tmp / "with_adapters")
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone()
    report["merged"] = merge_lora(model)
    report["merged_left"] = len(list(lora_adapters(model)))
    report["merged_err"] = (_logits(model, batch) - adapted).abs().max().item()
    report["weight_moved"] = (model.decoder.layers[0].self_attention.linear_qkv.weight - qkv).abs().max().item()

    # dropout: training only
    dropped = _build(_config(lora=dataclasses.replace(LORA, dropout=0.5),
                             vision_lora=dataclasses.replace(VISION_LORA, dropout=0.5)))
    dropped.load_state_dict(full, strict=False)
    fresh = _build(_config(vision_lora=VISION_LORA))
    fresh.load_state_dict(full, strict=False)
    report["dropout_eval_equal"] = torch.equal(_logits(dropped.eval(), batch), _logits(fresh.eval(), batch))
    report["dropout_train_differs"] = (_logits(dropped.train(), batch) - adapted).abs().max().item()

    # weights-only loads
    save_model_weights(base, tmp / "no_adapters")
    target = _build(_config(vision_lora=VISION_LORA))
    load_model_weights(target, tmp / "no_adapters")
    report["import_keeps_zero_b"] = torch.equal(_logits(target, batch), _logits(base, batch))
    load_model_weights(target, tmp / "with_adapters")
    report["reload_err"] = (_logits(target, batch) - adapted).abs().max().item()
    report["refused"] = _refusal(_build(_config(lora=LoRAConfig())), tmp / "with_adapters")
    return report


def test_adapters_start_as_the_backbone_merge_exactly_and_load_as_weights(tmp_path):
    r, = run_distributed(_single_process, world_size=1, tmp=tmp_path)
    assert r["zero_b_equal"]
    assert r["adapters"] == 4 * 4 + 2 * 3  # 4 LM layers x (qkv, proj, fc1, fc2), 2 encoder blocks x 3
    assert r["trained_lm"] == [] and r["trained_vision"] == [], "the frozen weights must not train"
    assert r["adapters_trained_new"]
    # replace: layers 1 and 3 hold CASA instead of self-attention, so only their MLP is adapted
    assert [n for n in r["replace_adapters"] if n.startswith(("decoder.layers.1.", "decoder.layers.3."))] == [
        f"decoder.layers.{i}.mlp.linear_{fc}_lora" for i in (1, 3) for fc in ("fc1", "fc2")]
    assert len(r["replace_adapters"]) == 12
    assert r["adapters_change_logits"] > 1e-3
    assert r["merged"] == 22 and r["merged_left"] == 0
    assert r["merged_err"] < 1e-5 and r["weight_moved"] > 1e-4
    assert r["dropout_eval_equal"]
    assert r["dropout_train_differs"] > 1e-3
    assert r["import_keeps_zero_b"]
    assert r["reload_err"] == 0.0
    assert r["refused"] and "holds LoRA adapters" in r["refused"] and "model.lora" in r["refused"]


@pytest.mark.parametrize("recompute", [None, {"granularity": "full", "num_layers": 2}], ids=["kept", "recomputed"])
def test_tp2_with_and_without_sp_equals_one_process(recompute):
    """Losses, logits and every trained gradient (adapters gathered by their partition tags); with
    the LM layers recomputed in backward too (the adapters' hooks run again inside the chunk)."""
    reports = run_distributed(tp_worker, world_size=2, fusion={}, recompute=recompute,
                              vision={"trainable_blocks": 0, "lora": VISION_LORA},
                              model_fields={"freeze_lm": True, "lora": LORA})
    assert all(err < 1e-4 for err in reports[0]["max_grad_err"].values())


def test_interleaved_pipeline_equals_one_process_with_dora_on_some_layers():
    """PP=2 with two model chunks per rank (layers 0 and 2 on rank 0, 1 and 3 on rank 1): DoRA
    adapters on layers 1 and 2 only, one on each rank's other chunk, trained through the
    interleaved schedule, give one process's losses and gradients."""
    from support.equivalence import vpp_worker

    lora = LoRAConfig(rank=2, alpha=4.0, layers=[1, 2], dora=True)
    first, second = run_distributed(vpp_worker, world_size=2, fusion={},
                                    model_fields={"freeze_lm": True, "lora": lora})
    adapters = {r: {n.split(".")[2] for n in report["checked"] if "_lora." in n}
                for r, report in enumerate((first, second))}
    assert adapters == {0: {"2"}, 1: {"1"}}
    assert any(n.endswith("lora_magnitude") for n in first["checked"])


def test_pp2_equals_one_process_insertion_some_layers():
    lora = LoRAConfig(rank=3, alpha=3.0, layers=[0, 2, 3])
    reports = run_distributed(pp_worker, world_size=2, fusion={"mechanism": "insertion"},
                              model_fields={"freeze_lm": True, "lora": lora})
    checked = {r["stage"]: r["checked"] for r in reports}
    lora_names = [n for names in checked.values() for n in names if "_lora." in n]
    assert {n.split(".")[2] for n in lora_names} == {"0", "2", "3"}  # both stages' adapters checked
    assert len(lora_names) == 3 * 4 * 2


def test_pp2_with_the_encoder_split_equals_one_process():
    """Encoder adapters on both stages (block 0 | block 1 + the LM): keyed and seeded by global
    block index, gradients equal to one process's."""
    reports = run_distributed(pp_worker, world_size=2, fusion={}, vision_split=[1, 1],
                              vision={"trainable_blocks": 0, "lora": VISION_LORA},
                              model_fields={"freeze_lm": True, "lora": LORA})
    vision = {r["stage"]: sorted(n for n in r["checked"] if n.startswith("vision.") and "_lora." in n)
              for r in reports}
    assert [n.split(".")[2] for n in vision[0]] == ["0"] * 6 and [n.split(".")[2] for n in vision[1]] == ["1"] * 6


def _layouts(rank, world, tmp, dora=False):
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state
    from casa_megatron.training.pretrained import load_model_weights, save_model_weights

    cfg = _config(lora=DORA, vision_lora=VISION_DORA) if dora else _config(vision_lora=VISION_LORA)
    one = _build(cfg)
    initial = {n: p.detach().clone() for n, p in one.named_parameters() if "_lora." in n}
    full = perturbed_full_state(one)
    two = _build(cfg, tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    gathered = gather_full(two, {n: p.detach() for n, p in two.named_parameters() if "_lora." in n}, group)
    # A and B to the bit; m = ||W|| of a row-parallel weight sums its squares in another order
    # (each rank's columns, then all-reduced): equal to rounding
    same_init = sorted(n for n in initial if torch.equal(gathered[n], initial[n]) or (
        n.endswith("lora_magnitude") and torch.allclose(gathered[n], initial[n], rtol=1e-6, atol=0)))
    load_full_state(two, full, parallel_state.get_tensor_model_parallel_rank(), 2)
    save_model_weights(two, tmp / "tp2")
    back = _build(cfg)  # TP=1 (DP=2)
    load_model_weights(back, tmp / "tp2")
    differ = sorted(n for n, p in back.named_parameters() if not torch.equal(p, full[n]))
    return {"initial": sorted(initial), "same_init": same_init, "differ": differ}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_initial_adapters_and_checkpoints_do_not_depend_on_tp(tmp_path, dora):
    """A, B (and DoRA's m = ||W||, from TP-independent weights) the same at TP=1 and TP=2; a TP=2
    save loads at TP=1 (m of fc1 in the SwiGLU layout, m of a row-parallel linear whole)."""
    reports = run_distributed(_layouts, world_size=2, tmp=tmp_path, dora=dora)
    for r in reports:
        assert r["same_init"] == r["initial"] and len(r["initial"]) == (3 if dora else 2) * (16 + 6)
        assert r["differ"] == []


# --- DoRA (``lora.dora``) -------------------------------------------------------------------------
DORA = dataclasses.replace(LORA, dora=True)
VISION_DORA = dataclasses.replace(VISION_LORA, dora=True)


def _perturbed(model, keep=lambda name: True):
    """Every parameter (``keep``) plus noise: the same full tensors at any layout."""
    model.load_state_dict({n: t for n, t in perturbed_full_state(model).items() if keep(n)}, strict=False)
    return model


def _dora_single_process(rank, world, tmp):
    from casa_megatron.model.lora import merge_lora
    from casa_megatron.training.pretrained import load_model_weights, save_model_weights

    batch = random_batch(1, with_labels=False)
    report = {}
    base = _build(_config(lora=LoRAConfig(), vision_lora=LoRAConfig()))
    dora = _build(_config(lora=DORA, vision_lora=VISION_DORA))
    report["zero_b_equal"] = torch.equal(_logits(base, batch), _logits(dora, batch))
    magnitudes = [n for n, p in dora.named_parameters() if n.endswith("lora_magnitude")]
    report["magnitudes"] = len(magnitudes)
    report["magnitudes_trained"] = all(p.requires_grad for n, p in dora.named_parameters() if n in magnitudes)

    # B, A and m perturbed: the merged weights compute what the adapters do
    _perturbed(dora, lambda n: "_lora." in n)
    adapted = _logits(dora, batch)
    report["dora_changes_logits"] = (adapted - _logits(base, batch)).abs().max().item()
    save_model_weights(dora, tmp / "dora")
    merged = _build(_config(lora=DORA, vision_lora=VISION_DORA))
    merged.load_state_dict(dora.state_dict(), strict=False)
    report["merged"] = merge_lora(merged)
    report["merged_err"] = (_logits(merged, batch) - adapted).abs().max().item()
    # merging without the magnitude (as plain LoRA would) is another function
    lora = _build(_config(vision_lora=VISION_LORA))
    lora.load_state_dict({n: t for n, t in dora.state_dict().items() if not n.endswith("lora_magnitude")},
                         strict=False)
    report["lora_differs"] = (_logits(lora, batch) - adapted).abs().max().item()

    # weights-only starts: from weights that differ from the ones the model was built with
    _perturbed(base)
    save_model_weights(base, tmp / "base")
    save_model_weights(lora, tmp / "lora")
    target = _build(_config(lora=DORA, vision_lora=VISION_DORA))
    load_model_weights(target, tmp / "base")  # m = ||W|| of the loaded W: the loaded function
    report["import_err"] = (_logits(target, batch) - _logits(base, batch)).abs().max().item()
    load_model_weights(target, tmp / "lora")  # a LoRA run: m = ||W + s B A||, the LoRA run's function
    report["from_lora_err"] = (_logits(target, batch) - _logits(lora, batch)).abs().max().item()
    load_model_weights(target, tmp / "dora")
    report["reload_err"] = (_logits(target, batch) - adapted).abs().max().item()
    report["refused"] = _refusal(_build(_config(vision_lora=VISION_LORA)), tmp / "dora")
    return report


def test_dora_starts_as_the_backbone_merges_and_loads(tmp_path):
    r, = run_distributed(_dora_single_process, world_size=1, tmp=tmp_path)
    assert r["zero_b_equal"]  # m = ||W||, B = 0: the backbone's function, to the bit
    assert r["magnitudes"] == 4 * 4 + 2 * 3 and r["magnitudes_trained"]
    assert r["dora_changes_logits"] > 1e-3
    assert r["merged"] == 22 and r["merged_err"] < 1e-5
    assert r["lora_differs"] > 1e-3
    assert r["import_err"] < 1e-5 and r["from_lora_err"] < 1e-5 and r["reload_err"] == 0.0
    assert r["refused"] and "holds DoRA magnitudes" in r["refused"] and "model.lora.dora=true" in r["refused"]


def test_dora_with_dropout_is_refused():
    from casa_megatron.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"model.lora.dora=true with model.lora.dropout=0.1"):
        dataclasses.replace(DORA, dropout=0.1).validate(4)


def test_dora_tp2_with_and_without_sp_equals_one_process():
    """The row-parallel norms (all-reduced over TP), the magnitudes split like B's rows (fc1 in
    the SwiGLU stride) or whole and summed under SP: gradients as one process's."""
    reports = run_distributed(tp_worker, world_size=2, fusion={}, vision={"trainable_blocks": 0, "lora": VISION_DORA},
                              model_fields={"freeze_lm": True, "lora": DORA})
    magnitudes = [n for n in reports[0]["trained"] if n.endswith("lora_magnitude")]
    assert len(magnitudes) == 4 * 4 + 2 * 3  # every adapter's m trained and compared
    assert all(err < 1e-4 for err in reports[0]["max_grad_err"].values())


def _pp_weights_only(rank, world, tmp):
    """A TP=1 save with adapters on the last LM layer only, loaded weights-only at PP=2: stage 0
    holds no adapter, yet the model has LoRA (the checkpoint's adapters belong to stage 1)."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import load_model_weights, save_model_weights
    from support.hf_equivalence import stage_logits

    cfg = _config(lora=LoRAConfig(rank=2, layers=[3], dora=True))
    one = _perturbed(_build(cfg))  # DP=2 at TP=1: both ranks the same model
    save_model_weights(one, tmp / "one")
    batch = random_batch(1, with_labels=False)
    ref = stage_logits(one, batch, IMAGE_SLOTS)
    initialize_parallel(1, 2, seed=0)
    two = build_vlm(cfg, ParallelConfig(pipeline_model_parallel_size=2), IMAGE_SLOTS)
    load_model_weights(two, tmp / "one")
    out = stage_logits(two, batch, IMAGE_SLOTS)
    return {"adapters": sum(1 for n, _ in two.named_parameters() if "_lora." in n),
            "err": None if out is None else (out - ref).abs().max().item()}


def test_weights_only_load_at_pp2_with_adapters_on_one_stage(tmp_path):
    reports = run_distributed(_pp_weights_only, world_size=2, tmp=tmp_path)
    (first, last) = reports
    assert first["adapters"] == 0 and first["err"] is None  # it used to refuse: "no place for"
    assert last["adapters"] == 4 * 3 and last["err"] < 1e-5  # qkv, proj, fc1, fc2: A, B, m


def _padded_encoder_adapters(rank, world):
    """Adapters on a Qwen2.5-VL-shaped encoder whose MLP is padded (45 -> 48 units), at TP=2:
    ``fc2``'s ``A`` columns 45..47 read units that are always zero: they start at zero and their
    gradient is zero, so the merged weight and DoRA's row norms see only the real units."""
    from megatron.core import parallel_state

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import gather_full
    from support.equivalence import masked_loss
    from support.vlm import QWEN_VISION

    cfg = dataclasses.replace(small_model_config({**QWEN_VISION, "trainable_blocks": 0, "lora": VISION_DORA}),
                              freeze_lm=True)
    initialize_parallel(world, 1, seed=0)
    model = build_vlm(cfg, ParallelConfig(tensor_model_parallel_size=world), IMAGE_SLOTS)
    _perturbed(model, lambda n: n.endswith("lora_b"))
    batch = random_batch(1, temporal=2)
    masked_loss(model(batch), batch).backward()
    group = parallel_state.get_tensor_model_parallel_group()
    names = [n for n, _ in model.named_parameters() if n.endswith("mlp.linear_fc2_lora.lora_a")]
    a = gather_full(model, {n: p.detach() for n, p in model.named_parameters() if n in names}, group)
    grads = gather_full(model, {n: p.grad for n, p in model.named_parameters() if n in names}, group)
    real = cfg.vision.ffn_hidden_size
    return {n: (a[n].shape[1], a[n][:, real:].abs().sum().item(), a[n][:, :real].abs().sum().item(),
                grads[n][:, real:].abs().sum().item(), grads[n][:, :real].abs().sum().item()) for n in names}


def test_adapters_leave_the_encoders_padded_units_out():
    for report in run_distributed(_padded_encoder_adapters, world_size=2):
        assert len(report) == 2, report  # fc2 of both blocks
        for width, pad, real, pad_grad, real_grad in report.values():
            assert width == 48 and pad == 0.0 and pad_grad == 0.0 and real > 0 and real_grad > 0, report

"""The token-insertion baseline: layout, a literal interleaved reference, packed-sample masking,
and TP=2 (+SP) / PP=2 equivalence to one process (loss, logits, every gradient incl. the ViT's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, SEQ, perturbed_full_state, random_batch, small_model_config

TOL = dict(rtol=2e-4, atol=2e-5)
INSERTION = {"mechanism": "insertion"}


def _build(tp: int = 1, pp: int = 1, sp: bool = False):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(tp, pp, seed=0)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp)
    return build_vlm(small_model_config(**INSERTION), parallel, image_seq_length=IMAGE_SLOTS)


def _masked_loss(per_token, batch):
    return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()


# --- layout (pure index bookkeeping) -----------------------------------------------------------
def test_layout_of_a_packed_row_by_hand():
    """Row: t0 t1 t2 | t3 t4 with a 2-token image before t1 and a 1-token image before t3,
    which also starts the second packed sample; 2 padding slots (si = 5)."""
    from casa_megatron.model.insertion import build_insertion_layout

    starts = torch.tensor([[True, False, False, True, False]])
    layout = build_insertion_layout(
        1, 5, 5, image_rows=torch.tensor([0, 0]), image_positions=torch.tensor([1, 3]),
        image_num_tokens=torch.tensor([2, 1]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
        sample_starts=starts)
    # combined: t0 i i t1 t2 | i t3 t4 | pad pad
    assert layout.text_index.tolist() == [0, 3, 4, 6, 7]
    assert layout.image_index.tolist() == [1, 2, 5]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]
    assert layout.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]]
    assert layout.source_index.tolist() == [0, 5, 6, 1, 2, 7, 3, 4, 8, 8]
    mask = layout.attention_mask()[0, 0]
    assert not mask[4, 1] and mask[5, 4] and not mask[7, 5] and mask[1, 2]


def test_layout_rejects_a_row_with_more_image_tokens_than_slots():
    from casa_megatron.model.insertion import build_insertion_layout

    with pytest.raises(ValueError, match="image_seq_length=2"):
        build_insertion_layout(2, 4, 2, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1, 3]),
                               torch.arange(4).repeat(2, 1), None)


# --- a literal reference ----------------------------------------------------------------------
def _naive_per_token_loss(model, batch):
    """Build every row's interleaved sequence token by token, a dense mask and positions by loops,
    and run the model's own modules on it. Returns [b, s] loss on the text positions."""
    from casa_megatron.model.vision import tokens_per_image

    b, s = batch.shape
    length = s + model.image_seq_length
    text = model.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids)  # [s, b, h]
    images = model.projector(model.vision(batch.pixel_patches, batch.image_grid_hw))  # [n_tok, h]
    per_image = list(images.split(tokens_per_image(batch.image_grid_hw).tolist()))
    rows, cols = batch.image_rows.tolist(), batch.image_positions.tolist()
    streams, positions, segments, text_slots = [], [], [], []
    for r in range(b):
        seq, pos, seg, slots = [], [], [], []
        sample, in_sample, origin = -1, 0, 0
        for p in range(s):
            if p == 0 or bool(batch.sample_starts[r, p]):
                sample, in_sample, origin = sample + 1, 0, int(batch.position_ids[r, p])
            for k in range(len(rows)):
                if rows[k] == r and cols[k] == p:
                    for token in per_image[k]:
                        seq.append(token), pos.append(origin + in_sample), seg.append(sample)
                        in_sample += 1
            slots.append(len(seq))
            seq.append(text[p, r]), pos.append(origin + in_sample), seg.append(sample)
            in_sample += 1
        while len(seq) < length:
            seq.append(torch.zeros_like(text[0, 0])), pos.append(0), seg.append(-1)
        streams.append(torch.stack(seq)), positions.append(pos), segments.append(seg), text_slots.append(slots)
    hidden = torch.stack(streams, dim=1)  # [L, b, h]
    mask = torch.ones(b, 1, length, length, dtype=torch.bool)
    for r in range(b):
        for i in range(length):
            for j in range(i + 1):
                if segments[r][i] == segments[r][j]:
                    mask[r, 0, i, j] = False
    rotary = model.rotary.text_freqs(torch.tensor(positions))
    for layer in model.decoder.layers:
        hidden, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
    hidden = model.decoder.final_layernorm(hidden)
    text_out = torch.stack([hidden[text_slots[r], r] for r in range(b)], dim=1)  # [s, b, h]
    logits, _ = model.output_layer(text_out)
    return torch.nn.functional.cross_entropy(
        logits.float().permute(1, 2, 0), batch.labels, reduction="none")  # [b, s]


def _single_process_checks(rank, world):
    model = _build()
    full = perturbed_full_state(model)
    from casa_megatron.parallel.tp_layout import load_full_state

    load_full_state(model, full, 0, 1)
    batch = random_batch(3)
    out = model(batch)
    with torch.no_grad():
        naive = _naive_per_token_loss(model, batch)
    # Sample 2 of row 1 starts at text position 8; its image sits at 11. Perturb only that image.
    grid = batch.image_grid_hw
    first_patch = int((grid[:4, 0] * grid[:4, 1]).sum())
    pixels = batch.pixel_patches.clone()
    pixels[first_patch:] += 3.0 * torch.randn_like(pixels[first_patch:])
    with torch.no_grad():
        perturbed = model(dataclasses.replace(batch, pixel_patches=pixels))
    return {"out": out.detach(), "naive": naive, "perturbed": perturbed,
            "shape": tuple(out.shape), "new": [n for n, p in model.named_parameters() if p.casa_new]}


def test_single_process_matches_literal_interleaving_and_isolates_packed_samples():
    r = run_distributed(_single_process_checks, world_size=1)[0]
    out, naive, perturbed = (torch.as_tensor(r[k]) for k in ("out", "naive", "perturbed"))
    assert r["shape"] == (2, SEQ)
    torch.testing.assert_close(out, naive, **TOL)
    # Row 0 and sample 1 of row 1 do not see sample 2's image; sample 2's text after it does.
    torch.testing.assert_close(perturbed[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(perturbed[1, :8], out[1, :8], rtol=0, atol=0)
    assert (perturbed[1, 11:] - out[1, 11:]).abs().min() > 1e-6
    assert all(n.startswith("projector.") for n in r["new"])  # no fusion layers at all


# --- tensor parallelism -------------------------------------------------------------------------
def _finalize_sp_grads(model):
    from megatron.core import parallel_state

    for p in model.parameters():
        if p.grad is not None and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def _tp_worker(rank, world):
    from megatron.core import parallel_state, tensor_parallel

    from casa_megatron.parallel.tp_layout import gather_full, load_full_state

    batch, logits_batch = random_batch(1), random_batch(1, with_labels=False)
    ref = _build()
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_loss = _masked_loss(ref(batch), batch)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        ref_logits = ref(logits_batch)
    report = {}
    for sp in (False, True):
        model = _build(tp=2, sp=sp)
        load_full_state(model, full, parallel_state.get_tensor_model_parallel_rank(), 2)
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
        report[sp] = loss.item()
    assert all(g.abs().sum() > 0 for n, g in ref_grads.items() if n.startswith(("vision.", "projector.")))
    return report


def test_tensor_parallel_matches_single_process():
    """TP=2 without and with sequence parallelism: loss, text logits and every gradient."""
    reports = run_distributed(_tp_worker, world_size=2)
    assert set(reports[0]) == {False, True}


# --- pipeline parallelism ------------------------------------------------------------------------
def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch)

    def loss_func(per_token):
        loss = _masked_loss(per_token, batch)
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _run_schedule(model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=SEQ + IMAGE_SLOTS, micro_batch_size=2,
    )
    return [l["loss"] for l in losses]


def _global_name(name: str, offset: int) -> str:
    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + offset)
        return ".".join(parts)
    return name


def _pp_worker(rank, world):
    from megatron.core import parallel_state

    from casa_megatron.parallel.tp_layout import load_full_state

    batches = [random_batch(seed) for seed in (11, 12, 13)]
    ref = _build()
    full = perturbed_full_state(ref)
    load_full_state(ref, full, 0, 1)
    ref_losses = _run_schedule(ref, batches)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    stage = _build(pp=2)
    to_global = {n: _global_name(n, stage.decoder.layer_offset) for n, _ in stage.named_parameters()}
    load_full_state(stage, {n: full[g] for n, g in to_global.items()}, 0, 1)
    losses = _run_schedule(stage, batches)
    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[to_global[name]], **TOL, msg=lambda m: f"{name}: {m}")
    return {"checked": sorted(to_global.values()),
            "vision_grad_norm": sum(p.grad.norm().item() for n, p in stage.named_parameters()
                                    if n.startswith("vision."))}


def test_pipeline_parallel_matches_single_process():
    """PP=2 through megatron's 1F1B schedule with 3 micro-batches: the combined stream
    [s + si, b, h] crosses the stage boundary and the ViT gets its gradient back."""
    reports = run_distributed(_pp_worker, world_size=2)
    first, second = reports[0]["checked"], reports[1]["checked"]
    assert any(n.startswith("vision.") for n in first) and not any(n.startswith("vision.") for n in second)
    assert any(n.startswith("decoder.layers.3.") for n in second)
    assert reports[0]["vision_grad_norm"] > 0
    assert not set(first) & set(second)

"""The token-insertion baseline: layout, a literal interleaved reference, packed-sample masking,
and TP=2 (+SP) / PP=2 equivalence to one process (loss, logits, every gradient incl. the ViT's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.equivalence import TOL, build
from support.vlm import SEQ, perturbed_full_state, random_batch

INSERTION = {"mechanism": "insertion"}


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
    attention = dict(attention_mask=mask)
    if model.model_config.packed_attention:  # the same samples, given as cu_seqlens
        from casa_megatron.model.packed_attention import packed_seq_params, segment_starts

        attention = dict(attention_mask=None,
                         packed_seq_params=packed_seq_params(segment_starts(torch.tensor(segments))))
    for layer in model.decoder.layers:
        hidden, _ = layer(hidden_states=hidden, rotary_pos_emb=rotary, **attention)
    hidden = model.decoder.final_layernorm(hidden)
    text_out = torch.stack([hidden[text_slots[r], r] for r in range(b)], dim=1)  # [s, b, h]
    logits, _ = model.output_layer(text_out)
    return torch.nn.functional.cross_entropy(
        logits.float().permute(1, 2, 0), batch.labels, reduction="none")  # [b, s]


def _single_process_checks(rank, world):
    model = build(**INSERTION)
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


# TP=2 / PP=2 equivalence for insertion: tests/model/test_vlm_parallel.py (variant 'insertion').

"""Packing invariants on a random mix of image QA and video samples.

Every sample lands exactly once, intact, within both per-row budgets; images are in stream order
on window starts; the model's own window builder accepts every batch; targets only on answers.
"""

from __future__ import annotations

import random
from typing import List

import pytest
import torch

from casa_megatron.data.annotations import parse_annotation
from casa_megatron.data.interleave import fit_to_budget, image_sample, video_sample
from casa_megatron.data.packing import Packer
from casa_megatron.data.patches import image_to_patches
from casa_megatron.data.records import TokenizedSample
from casa_megatron.data.tokenization import TextTokenizer
from casa_megatron.model.batch import window_start_marks
from casa_megatron.model.vision import tokens_per_image
from casa_megatron.model.windows import build_windows, placements_from_placeholders

SEQ, IMAGE_SLOTS, BATCH = 96, 160, 3
WORDS = "red green blue circle square triangle one two three cat dog the moves left right".split()


def _random_samples(tok: TextTokenizer, n: int, seed: int) -> List[TokenizedSample]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))  # noqa: E731
        if rng.random() < 0.7:
            turns = [{"question": words(6), "answer": words(3)} for _ in range(rng.randint(1, 3))]
            px = torch.randint(0, 256, (3, 28 * rng.randint(1, 4), 28 * rng.randint(1, 4)), dtype=torch.uint8,
                               generator=g)
            s = image_sample(f"img{i}", parse_annotation({"conversation": turns}), px, tok,
                             rng.choice(["per_turn", "per_sample"]))
        else:
            n_frames = rng.randint(1, 5)
            frames = torch.randint(0, 256, (n_frames, 3, 28, 56), dtype=torch.uint8, generator=g)
            caps = [{"t": t * 0.5, "text": words(4)} for t in range(n_frames) if rng.random() < 0.7] \
                or [{"t": 0.0, "text": words(3)}]
            s = video_sample(f"vid{i}", parse_annotation({"captions": caps}), frames,
                             [k * 0.5 for k in range(n_frames)], 2.0, tok, window_per_frame=rng.random() < 0.6)
        out.append(fit_to_budget(s, SEQ, IMAGE_SLOTS))
    return out


def _pack_all(packer: Packer, samples, buffer_size: int):
    """The loader's loop: keep the buffer full, pack, until every sample is out."""
    pending, buffer, batches = list(samples), [], []
    while pending or buffer:
        while pending and len(buffer) < buffer_size:
            buffer.append(pending.pop(0))
        batch, infos, buffer = packer.next_batch(buffer)
        batches.append((batch, infos))
    return batches


@pytest.fixture(scope="module")
def packed(tokenizer_dir):
    tok = TextTokenizer(tokenizer_dir)
    samples = _random_samples(tok, 120, seed=0)
    packer = Packer(BATCH, SEQ, IMAGE_SLOTS, tok.special.pad)
    return tok, samples, packer, _pack_all(packer, samples, buffer_size=24)


def test_every_sample_packed_once_and_intact(packed):
    tok, samples, _, batches = packed
    by_key = {s.key: s for s in samples}
    seen = []
    for batch, infos in batches:
        covered = torch.zeros(batch.shape, dtype=torch.bool)
        for info in infos:
            s = by_key[info.key]
            sl = slice(info.start, info.start + info.length)
            assert info.length == len(s)
            assert batch.input_ids[info.row, sl].tolist() == s.input_ids
            assert batch.labels[info.row, sl].tolist() == s.labels
            assert batch.loss_mask[info.row, sl].tolist() == s.loss_mask
            assert batch.position_ids[info.row, sl].tolist() == list(range(len(s)))
            assert batch.sample_starts[info.row, info.start]
            assert not covered[info.row, sl].any()
            covered[info.row, sl] = True
            seen.append(info.key)
        # everything not covered by a sample is padding without targets
        assert (batch.input_ids[~covered] == tok.special.pad).all()
        assert (batch.loss_mask[~covered] == 0).all()
    assert sorted(seen) == sorted(by_key)  # no sample lost or duplicated


def test_budgets_and_stream_order(packed):
    _, _, _, batches = packed
    for batch, infos in batches:
        text_per_row = torch.zeros(BATCH, dtype=torch.long)
        for info in infos:
            text_per_row[info.row] += info.length
        assert (text_per_row <= SEQ).all()
        tokens = tokens_per_image(batch.image_grid_hw)
        per_row = torch.zeros(BATCH, dtype=torch.long).index_add_(0, batch.image_rows, tokens)
        assert (per_row <= IMAGE_SLOTS).all()
        key = batch.image_rows * SEQ + batch.image_positions
        assert (key[1:] >= key[:-1]).all()


def test_images_pixels_and_windows_match(packed):
    _, samples, _, batches = packed
    by_key = {s.key: s for s in samples}
    for batch, infos in batches:
        expected_patches, expected_rows, expected_pos, expected_starts = [], [], [], set()
        for info in sorted(infos, key=lambda i: (i.row, i.start)):
            s = by_key[info.key]
            expected_starts |= {(info.row, info.start + w) for w in [0] + s.window_starts}
            for im in s.images:
                # CLIP normalisation from its definition: (x / 255 - mean) / std per channel
                mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
                std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
                expected_patches.append(image_to_patches((im.pixels.float() / 255 - mean) / std)[0])
                expected_rows.append(info.row)
                expected_pos.append(info.start + im.position)
        assert batch.image_rows.tolist() == expected_rows
        assert batch.image_positions.tolist() == expected_pos
        if expected_patches:
            torch.testing.assert_close(batch.pixel_patches, torch.cat(expected_patches), rtol=1e-6, atol=1e-6)
        row_end = {r: 0 for r in range(BATCH)}
        for info in infos:
            row_end[info.row] = max(row_end[info.row], info.start + info.length)
        padding_starts = {(r, end) for r, end in row_end.items() if end < SEQ}
        marked = {tuple(x) for x in batch.window_starts.nonzero().tolist()}
        assert marked == expected_starts | padding_starts  # QA pairs / frames / samples, nothing else
        assert batch.window_starts[batch.image_rows, batch.image_positions].all()


def test_model_window_builder_accepts_every_batch(packed):
    tok, _, _, batches = packed
    for batch, _ in batches:
        marks = window_start_marks(batch)
        counts = tokens_per_image(batch.image_grid_hw)
        layout = build_windows(*batch.shape, batch.image_rows, batch.image_positions, counts,
                               window_starts=marks, position_ids=batch.position_ids,
                               num_image_embeddings=int(counts.sum()))
        assert layout.num_windows == int(marks.sum())
        windows_with_images = len({(r, p) for r, p in zip(batch.image_rows.tolist(),
                                                           batch.image_positions.tolist())})
        assert int(layout.window_has_image.sum()) == windows_with_images
        # placeholders reproduce the placements (adjacent ones = one clip window)
        rows, pos, _ = placements_from_placeholders(batch.input_ids, tok.special.image, counts,
                                                    merge_adjacent=True)
        assert torch.equal(rows, batch.image_rows) and torch.equal(pos, batch.image_positions)


def test_targets_only_on_answers_and_next_token(packed):
    tok, _, _, batches = packed
    sp = tok.special
    for batch, infos in batches:
        rows, cols = batch.loss_mask.nonzero(as_tuple=True)
        assert (batch.labels[rows, cols] == batch.input_ids[rows, cols + 1]).all()
        assert not batch.sample_starts[rows, cols + 1].any()  # never across samples
        layout_tokens = torch.tensor([sp.bos, sp.pad, sp.image, sp.answer])
        assert not torch.isin(batch.labels[rows, cols], layout_tokens).any()
        untrained = batch.loss_mask == 0
        assert (batch.labels[untrained] == sp.pad).all()


def test_packing_efficiency_is_reported_and_consistent(packed):
    _, samples, packer, batches = packed
    st = packer.stats
    assert st.batches == len(batches) and st.samples == len(samples)
    assert st.text_tokens == sum(len(s) for s in samples)
    assert st.image_tokens == sum(s.num_image_tokens for s in samples)
    assert st.text_utilization == pytest.approx(st.text_tokens / (len(batches) * BATCH * SEQ))
    # all but the draining batches are well filled by the first-fit buffer
    full = batches[:-3]
    util = [max(float((b.input_ids != 0).float().mean()), 0) for b, _ in full]
    assert min(util) > 0.5
    print(f"\npacking: text {100 * st.text_utilization:.1f}% image {100 * st.image_utilization:.1f}% "
          f"of slots, {st.samples / st.rows:.2f} samples/row")


def test_empty_batch_shapes(tokenizer_dir):
    packer = Packer(2, 8, 4, pad_id=0)
    batch, infos = packer.collate([[], []])
    assert infos == [] and batch.pixel_patches.shape == (0, 588) and batch.image_grid_hw.shape == (0, 2)
    assert batch.sample_starts[:, 0].all()


def test_question_type_ids_follow_the_samples(packed):
    from casa_megatron.data.packing import question_type_ids

    _, _, _, batches = packed
    import dataclasses

    batch, infos = batches[0]
    infos = [dataclasses.replace(i, qtype="fine" if i.kind == "video" else "coarse") for i in infos]
    ids = question_type_ids(infos, batch.shape, ["coarse", "fine"])
    for info in infos:
        span = ids[info.row, info.start:info.start + info.length]
        assert (span == (1 if info.kind == "video" else 0)).all()
    assert int((ids >= 0).sum()) == sum(i.length for i in infos)


def test_patch_normalizer_equals_normalize_then_cut():
    """The collate's in-place normaliser against the two functions it replaces, on odd sizes and stats."""
    from casa_megatron.data.image_processing import normalize_pixels
    from casa_megatron.data.packing import PatchNormalizer

    g = torch.Generator().manual_seed(3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.35, 0.5)
    images = [torch.randint(0, 256, (3, 28 * h, 28 * w), dtype=torch.uint8, generator=g)
              for h, w in ((1, 1), (2, 5), (4, 3))]
    got = PatchNormalizer(mean, std)([image_to_patches(px)[0] for px in images])
    expected = [image_to_patches(normalize_pixels(px, mean, std))[0] for px in images]
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-6, atol=1e-6)
    assert PatchNormalizer(mean, std)([]).shape == (0, 588)


def test_patch_normalizer_follows_any_patch_layout():
    """A Qwen2.5-VL-like layout ([C, T, p, p] rows, the image repeated T=2 times) is followed too."""
    from casa_megatron.data.image_processing import normalize_pixels
    from casa_megatron.data.packing import PatchNormalizer

    def temporal_patches(image, t=2, p=14, m=2):  # [C, H, W] -> [h*w, C*T*p*p]
        c, height, width = image.shape
        h, w = height // p, width // p
        x = image[None].expand(t, -1, -1, -1).reshape(t, c, h // m, m, p, w // m, m, p)
        return x.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(h * w, c * t * p * p), (h, w)

    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8, generator=g) for _ in range(2)]
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    got = PatchNormalizer(mean, std, temporal_patches)([temporal_patches(px)[0] for px in images])
    expected = torch.cat([temporal_patches(normalize_pixels(px, mean, std))[0] for px in images])
    assert got.shape == (2 * 6 * 4, 3 * 2 * 196)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=2e-6)

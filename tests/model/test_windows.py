"""CASA window layout tests.

The main check compares ``build_windows`` + the torch window kernel against a
naive float64 reference written straight from the CASA definition (per query:
walk back to the latest window start, take the images inserted there, then the
window's text up to the query, explicit softmax). The reference never looks at
``WindowLayout``, so a bookkeeping bug cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch

from casa_megatron.model.kernels import window_attention
from casa_megatron.model.windows import (
    WindowLayout,
    build_windows,
    placements_from_placeholders,
    segment_starts_from_cu_seqlens,
)

D = 8  # head dim


# ----------------------------------------------------------------------------- reference
def _is_start(row, pos, images, starts):
    if pos == 0:
        return True
    if starts is not None:
        return bool(starts[row][pos])
    return any(r == row and p == pos for r, p, _ in images)


def naive_casa(tq, tk, tv, ik, iv, images, b, s, starts=None, text_keys=True):
    """Reference CASA / cross-attention, one query at a time, in float64.

    tq [b*s, hq, d], tk/tv [b*s, hkv, d] text; ik/iv [n_image_tokens, hkv, d]
    images in stream order; images = [(row, pos, n_tokens)]; starts = optional
    [b][s] explicit window starts. Returns [b*s, hq, d].
    """
    hq, hkv = tq.shape[1], tk.shape[1]
    offsets, off = [], 0
    for _, _, n in images:
        offsets.append(off)
        off += n
    outs = []
    for row in range(b):
        for pos in range(s):
            st = pos
            while not _is_start(row, st, images, starts):
                st -= 1
            keys, vals = [], []
            for (r, p, n), o in zip(images, offsets):
                if r == row and p == st:
                    keys.append(ik[o : o + n])
                    vals.append(iv[o : o + n])
            if text_keys:
                keys.append(tk[row * s + st : row * s + pos + 1])
                vals.append(tv[row * s + st : row * s + pos + 1])
            q = tq[row * s + pos]  # [hq, d]
            if not keys or sum(x.shape[0] for x in keys) == 0:
                outs.append(q * 0.0)  # keeps the graph so grads are defined (zero)
                continue
            kk, vv = torch.cat(keys), torch.cat(vals)  # [n, hkv, d]
            heads = []
            for h in range(hq):
                g = h // (hq // hkv)
                scores = (kk[:, g] @ q[h]) / math.sqrt(q.shape[-1])  # [n]
                p = torch.exp(scores - scores.max())
                heads.append((p / p.sum()) @ vv[:, g])  # [d]
            outs.append(torch.stack(heads))
    return torch.stack(outs)


# ----------------------------------------------------------------------------- helpers
def _window_of(images, starts, b, s):
    """{(row, pos): window start} for every text token, from the definition."""
    res = {}
    for row in range(b):
        st = 0
        for pos in range(s):
            if _is_start(row, pos, images, starts):
                st = pos
            res[(row, pos)] = st
    return res


def _random_inputs(b, s, n_img_tok, hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    return r(b * s, hq, D), r(b * s, hkv, D), r(b * s, hkv, D), r(n_img_tok, hkv, D), r(n_img_tok, hkv, D)


def _layout(images, b, s, starts=None, **kw):
    rows = torch.tensor([r for r, _, _ in images], dtype=torch.long)
    pos = torch.tensor([p for _, p, _ in images], dtype=torch.long)
    n = torch.tensor([k for _, _, k in images], dtype=torch.long)
    ws = None if starts is None else torch.as_tensor(starts).to(torch.bool)
    return build_windows(b, s, rows, pos, n, window_starts=ws, **kw)


def casa_via_layout(layout: WindowLayout, tq, tk, tv, ik, iv, text_keys=True):
    """What a CASA layer does: gather packed KV with the layout, run the kernel."""
    if text_keys:
        k = torch.cat([tk, ik])[layout.kv_index]  # [total_kv, hkv, d]
        v = torch.cat([tv, iv])[layout.kv_index]
        cu_kv, max_kv = layout.cu_seqlens_kv, layout.max_seqlen_kv
    else:
        k, v = ik[layout.image_kv_index], iv[layout.image_kv_index]  # [n_image_tokens, hkv, d]
        cu_kv, max_kv = layout.cu_seqlens_image, layout.max_seqlen_image
    return window_attention(
        tq, k, v, layout.cu_seqlens_q, cu_kv, layout.max_seqlen_q, max_kv,
        causal_bottom_right=text_keys, backend="torch",
    )  # [b*s, hq, d]


SCENARIOS = {
    # row 0: two images share the window at 0, another at 5; row 1: leading text-only window.
    "mixed_gqa": dict(b=2, s=12, hq=4, hkv=2, images=[(0, 0, 2), (0, 0, 3), (0, 5, 1), (1, 3, 2), (1, 8, 4)]),
    "mha_single_row": dict(b=1, s=9, hq=2, hkv=2, images=[(0, 2, 3), (0, 6, 2)]),
    # packing boundaries without images (row 0 at 4, row 1 at 3) plus image windows.
    "explicit_starts_gqa": dict(
        b=2, s=10, hq=4, hkv=2, images=[(0, 7, 2), (1, 0, 1), (1, 6, 3)],
        starts=[[0, 0, 0, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0, 1, 0, 0, 0]],
    ),
    "no_images": dict(b=2, s=5, hq=2, hkv=1, images=[]),
}


def _check_against_reference(sc, text_keys, seed=0):
    b, s, images, starts = sc["b"], sc["s"], sc["images"], sc.get("starts")
    n_tok = sum(n for _, _, n in images)
    inputs = _random_inputs(b, s, n_tok, sc["hq"], sc["hkv"], seed=seed)
    layout = _layout(images, b, s, starts)
    got = casa_via_layout(layout, *inputs, text_keys=text_keys)
    want = naive_casa(*inputs, images, b, s, starts, text_keys=text_keys)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    params = [x for x in inputs if x.numel()]
    g_got = torch.autograd.grad((got * weight).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * weight).sum(), params, allow_unused=True)
    for x, a, w in zip(params, g_got, g_want):  # None = input unused (text k/v in cross mode)
        a = torch.zeros_like(x) if a is None else a
        w = torch.zeros_like(x) if w is None else w
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)
    return got, layout


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_casa_matches_naive_reference(name):
    _check_against_reference(SCENARIOS[name], text_keys=True, seed=len(name))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cross_attention_matches_naive_reference(name):
    sc = SCENARIOS[name]
    got, layout = _check_against_reference(sc, text_keys=False, seed=len(name))
    # text of imageless windows gets exactly zero
    q_win = torch.repeat_interleave(
        torch.arange(layout.num_windows), layout.cu_seqlens_q.diff().long()
    )
    no_img = ~layout.window_has_image[q_win]
    assert (got[no_img] == 0).all()
    if sc["images"]:
        assert (got[~no_img].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_random_placements_match_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    b, s = 2, 11
    images = []
    for row in range(b):
        pos = sorted(torch.randint(0, s, (3,), generator=g).tolist())  # duplicates share a window
        images += [(row, p, int(torch.randint(1, 4, (1,), generator=g))) for p in pos]
    sc = dict(b=b, s=s, hq=4, hkv=2, images=images)
    _check_against_reference(sc, text_keys=True, seed=seed)
    _check_against_reference(sc, text_keys=False, seed=seed)


def test_perturbing_an_image_only_changes_its_window():
    sc = SCENARIOS["mixed_gqa"]
    b, s, images = sc["b"], sc["s"], sc["images"]
    n_tok = sum(n for _, _, n in images)
    tq, tk, tv, ik, iv = (x.detach() for x in _random_inputs(b, s, n_tok, sc["hq"], sc["hkv"]))
    layout = _layout(images, b, s)
    base = casa_via_layout(layout, tq, tk, tv, ik, iv)
    window = _window_of(images, None, b, s)
    offset = 0
    for row, pos, n in images:
        ik2, iv2 = ik.clone(), iv.clone()
        ik2[offset : offset + n] += 1.0
        iv2[offset : offset + n] -= 2.0
        changed = (casa_via_layout(layout, tq, tk, tv, ik2, iv2) - base).abs().amax(dim=(1, 2)) > 1e-12
        expected = torch.tensor([window[(r, p)] == pos and r == row for r in range(b) for p in range(s)])
        assert torch.equal(changed, expected), (row, pos)
        offset += n


# ----------------------------------------------------------------------------- hand-worked
def test_hand_worked_single_row():
    layout = _layout([(0, 0, 2), (0, 3, 1)], 1, 6, position_ids=torch.arange(10, 16)[None])
    assert layout.cu_seqlens_q.tolist() == [0, 3, 6]
    assert layout.cu_seqlens_image.tolist() == [0, 2, 3]
    assert layout.cu_seqlens_kv.tolist() == [0, 5, 9]
    assert layout.cu_seqlens_q.dtype == layout.cu_seqlens_kv.dtype == torch.int32
    # cat([text(6), image(3)]): window 0 = img 6, 7 then text 0..2; window 1 = img 8 then text 3..5
    assert layout.kv_index.tolist() == [6, 7, 0, 1, 2, 8, 3, 4, 5]
    assert layout.kv_index.dtype == torch.int64
    assert layout.image_kv_index.tolist() == [0, 1, 2]
    assert layout.image_key_positions.tolist() == [10, 10, 13]
    assert layout.window_has_image.tolist() == [True, True]
    assert (layout.max_seqlen_q, layout.max_seqlen_kv, layout.max_seqlen_image) == (3, 5, 2)
    assert (layout.num_text_tokens, layout.num_image_tokens) == (6, 3)
    assert (layout.batch_size, layout.seq_length, layout.num_windows) == (1, 6, 2)


def test_hand_worked_text_only_row_and_shared_window():
    # row 0 text only; row 1: two images (1 + 2 tokens) share the window at 2.
    layout = _layout([(1, 2, 1), (1, 2, 2)], 2, 4)
    assert layout.cu_seqlens_q.tolist() == [0, 4, 6, 8]
    assert layout.cu_seqlens_image.tolist() == [0, 0, 0, 3]
    assert layout.cu_seqlens_kv.tolist() == [0, 4, 6, 11]
    assert layout.kv_index.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 6, 7]
    assert layout.window_has_image.tolist() == [False, False, True]
    assert layout.image_key_positions.tolist() == [2, 2, 2]
    assert layout.to("cpu").kv_index.tolist() == layout.kv_index.tolist()


def test_explicit_starts_hand_worked():
    starts = [[1, 0, 1, 0, 0]]
    layout = _layout([(0, 2, 1)], 1, 5, starts=starts)
    assert layout.cu_seqlens_q.tolist() == [0, 2, 5]
    assert layout.cu_seqlens_kv.tolist() == [0, 2, 6]
    assert layout.kv_index.tolist() == [0, 1, 5, 2, 3, 4]
    # position 0 is a start even when window_starts leaves it unmarked
    layout = _layout([], 1, 5, starts=[[0, 0, 0, 1, 0]])
    assert layout.cu_seqlens_q.tolist() == [0, 3, 5]


def test_placements_from_placeholders():
    P = 99
    tokens = torch.tensor([[P, 5, 6, P, P, 7], [1, 2, P, 3, 4, 5]])
    rows, pos, n = placements_from_placeholders(tokens, P, [2, 1, 3, 4])
    assert rows.tolist() == [0, 0, 0, 1] and pos.tolist() == [0, 3, 4, 2] and n.tolist() == [2, 1, 3, 4]
    rows, pos, _ = placements_from_placeholders(tokens, P, torch.tensor([2, 1, 3, 4]), merge_adjacent=True)
    assert pos.tolist() == [0, 3, 3, 2]
    layout = build_windows(2, 6, rows, pos, torch.tensor([2, 1, 3, 4]))
    assert layout.cu_seqlens_q.tolist() == [0, 3, 6, 8, 12]
    with pytest.raises(ValueError, match=r"missing image tokens.*4 placeholder.*3 image"):
        placements_from_placeholders(tokens, P, [1, 1, 1])


def test_segment_starts_from_cu_seqlens():
    starts = segment_starts_from_cu_seqlens(torch.tensor([0, 3, 8, 10]), 2, 5)
    assert starts.int().tolist() == [[1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    with pytest.raises(ValueError, match="cu_seqlens values"):
        segment_starts_from_cu_seqlens(torch.tensor([0, 11]), 2, 5)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        ([(0, 4, 1), (0, 2, 1)], {}, r"not in stream order.*image 1 at \(0, 2\)"),
        ([(1, 0, 1), (0, 3, 1)], {}, r"not in stream order"),
        ([(0, 6, 1)], {}, r"window overruns the sequence.*image 0.*position 6"),
        ([(0, -1, 1)], {}, r"window overruns the sequence"),
        ([(2, 0, 1)], {}, r"window overruns the sequence.*row 2"),
        ([(0, 1, 2), (0, 3, 0)], {}, r"image_num_tokens must be positive: image 1"),
        ([(0, 1, 2), (0, 3, 3)], {"num_image_embeddings": 4}, r"mismatch.*5 tokens.*produced 4"),
        ([(0, 1, 2), (0, 3, 3)], {"image_embedding_counts": torch.tensor([2, 4])}, r"image 1.*3 tokens.*produced 4"),
        ([(0, 1, 2)], {"starts": torch.zeros(2, 5, dtype=torch.bool)}, r"window_starts must have shape"),
        ([(0, 1, 2)], {"starts": torch.tensor([[1, 0, 0, 1, 0, 0]] * 2, dtype=torch.bool)},
         r"image 0 at \(0, 1\) does not start its window"),
        ([(0, 1, 2)], {"position_ids": torch.zeros(1, 6, dtype=torch.long)}, r"position_ids must have shape"),
    ],
)
def test_build_windows_errors(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layout(images, 2, 6, **kwargs)


def test_build_windows_error_lengths():
    with pytest.raises(ValueError, match="one entry per image"):
        build_windows(1, 4, torch.tensor([0, 0]), torch.tensor([0]), torch.tensor([1, 1]))

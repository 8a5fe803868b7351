"""Transforms invert each other, match megatron's layouts, and the RoPE permutation turns
Helium's interleaved rotation into megatron's rotate-half one exactly."""

from __future__ import annotations

import pytest
import torch

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.mapping import MappingTable, Row
from casa_megatron.conversion.transforms import (
    IDENTITY, QKV, Conv3dToLinear, FusedQKV, GatedMLP, PadFFN, PadVocab, rotary_half_permutation)

HEADS, GROUPS, HD, H = 8, 2, 6, 16


@pytest.mark.parametrize("transform, shapes", [
    (IDENTITY, [(5, 3)]),
    (QKV(HEADS, GROUPS, HD), [(HEADS * HD, H), (GROUPS * HD, H), (GROUPS * HD, H)]),
    (QKV(HEADS, GROUPS, HD), [(HEADS * HD,), (GROUPS * HD,), (GROUPS * HD,)]),  # biases
    (QKV(HEADS, GROUPS, HD, interleaved_rope=True), [(HEADS * HD, H), (GROUPS * HD, H), (GROUPS * HD, H)]),
    (FusedQKV(4, 4, HD), [(3 * 4 * HD, H)]),
    (GatedMLP(), [(7, H), (7, H)]),
    (PadVocab(99, 128), [(99, H)]),
    (PadFFN(45, 48, dim=1), [(H, 45)]),  # a vision down projection's columns
    (GatedMLP(pad=PadFFN(45, 48)), [(45, H), (45, H)]),  # gate / up rows
    (GatedMLP(pad=PadFFN(45, 48)), [(45,), (45,)]),  # their biases
    (Conv3dToLinear(3, 2, 14), [(32, 3, 2, 14, 14)]),
], ids=repr)
def test_round_trip_and_expected_shapes(transform, shapes):
    hf = [torch.randn(s) for s in shapes]
    megatron = transform.to_megatron(hf)
    back = transform.to_hf(megatron)
    assert len(back) == len(hf)
    for a, b in zip(back, hf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert transform.expected_hf_shapes(megatron.shape) == [tuple(s) for s in shapes]


def test_padded_units_are_zero_and_in_place():
    gate, up = torch.randn(45, H), torch.randn(45, H)
    fc1 = GatedMLP(pad=PadFFN(45, 48)).to_megatron([gate, up])  # [2 * 48, H]
    assert torch.equal(fc1[:45], gate) and torch.equal(fc1[48:93], up)
    assert fc1[45:48].abs().sum() == 0 and fc1[93:].abs().sum() == 0
    down = PadFFN(45, 48, dim=1).to_megatron([torch.randn(H, 45)])
    assert down.shape == (H, 48) and down[:, 45:].abs().sum() == 0


def test_export_refuses_padded_units_that_are_in_use():
    """Slicing the padding off is exact only while the padded gate / up rows are zero; the down
    projection's padded columns read zero outputs and are free."""
    fc1 = GatedMLP(pad=PadFFN(45, 48)).to_megatron([torch.randn(45, H), torch.randn(45, H)])
    down = torch.randn(H, 48)  # padded columns in use: still exact
    assert PadFFN(45, 48, dim=1).to_hf(down)[0].shape == (H, 45)
    fc1[94] = 1.0  # a row of the up half's padding
    with pytest.raises(ValueError, match=rf"{H} non-zero entries in the padded MLP units 45..47"):
        GatedMLP(pad=PadFFN(45, 48)).to_hf(fc1)


def test_qkv_layout_is_megatrons_grouped_layout():
    """Group g of the fused tensor holds its q heads, then its k head, then its v head."""
    q = torch.arange(HEADS * HD).float().view(HEADS * HD, 1)
    k, v = -1 - torch.arange(GROUPS * HD).float().view(-1, 1), 1000 + torch.arange(GROUPS * HD).float().view(-1, 1)
    fused = QKV(HEADS, GROUPS, HD).to_megatron([q, k, v]).view(GROUPS, HEADS // GROUPS + 2, HD)
    per = HEADS // GROUPS
    for g in range(GROUPS):
        torch.testing.assert_close(fused[g, :per].reshape(-1), q[g * per * HD:(g + 1) * per * HD, 0])
        torch.testing.assert_close(fused[g, per], k[g * HD:(g + 1) * HD, 0])
        torch.testing.assert_close(fused[g, per + 1], v[g * HD:(g + 1) * HD, 0])


def _interleaved_rope(x, theta):  # transformers' Helium: pairs (2i, 2i+1)
    cos, sin = theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _half_rope(x, theta):  # megatron / Llama: pairs (i, i + d/2)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rotary_permutation_makes_rotate_half_equal_interleaved():
    torch.manual_seed(0)
    d, n = 16, 10
    theta = torch.arange(n)[:, None].float() * (1e4 ** (-torch.arange(0, d, 2).float() / d))[None]
    q, k = torch.randn(n, d), torch.randn(n, d)
    perm = rotary_half_permutation(d)
    ref = _interleaved_rope(q, theta) @ _interleaved_rope(k, theta).T
    ours = _half_rope(q[:, perm], theta) @ _half_rope(k[:, perm], theta).T
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    unpermuted = _half_rope(q, theta) @ _half_rope(k, theta).T  # the permutation is needed
    assert (unpermuted - ref).abs().max() > 1e-2


def test_table_binds_wildcards_and_refuses_bad_rows():
    table = MappingTable("lm", [
        ("decoder.layers.{i}.mlp.linear_fc1.weight", ("m.{i}.gate", "m.{i}.up"), GatedMLP()),
        Row("decoder.layers.{i}.casa_gate", "m.{i}.gate_alpha", optional=True),
    ])
    b = table.bind("decoder.layers.17.mlp.linear_fc1.weight")
    assert b.hf == ("m.17.gate", "m.17.up") and isinstance(b.transform, GatedMLP)
    assert table.bind("decoder.layers.x.mlp.linear_fc1.weight") is None
    assert table.bind("decoder.layers.3.casa_gate").optional
    with pytest.raises(ConversionError, match="takes 2"):
        MappingTable("lm", [("a.weight", "b.weight", GatedMLP())])
    with pytest.raises(ConversionError, match="several rows"):
        MappingTable("lm", [("a.{i}.w", "x.{i}"), ("a.{j}.w", "y.{j}")]).bind("a.1.w")

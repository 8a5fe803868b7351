"""CASA attention and CASA layers as megatron-core modules (single process, CPU).

The reference below re-derives CASA from its definition with dense masks, its own RoPE and
the layer's full weights; it shares no code with the module under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, SEQ, random_batch, small_model_config

PLACEMENTS = {
    "parallel": dict(),
    "before": dict(placement="before", layers=[1, 3]),
    "replace_every_2": dict(placement="replace", every_n=2),
    "shared": dict(share_projections=True),
    "cross_attention": dict(mechanism="cross_attention", every_n=2),
}


def _build(**fusion):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    return build_vlm(small_model_config(**fusion), ParallelConfig(), image_seq_length=IMAGE_SLOTS)


def _rope(x, pos, base):  # x [n, h, d], pos [n]: rotate-half RoPE from its definition
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _window_ids(batch):
    """Window index of every text token and of every image, by scanning the definition."""
    b, s = batch.input_ids.shape
    starts = torch.zeros(b, s, dtype=torch.bool)
    starts[:, 0] = True
    starts |= batch.sample_starts
    starts[batch.image_rows, batch.image_positions] = True
    text_win = torch.cumsum(starts.flatten().long(), 0) - 1  # row-major, rows start windows
    image_win = text_win[batch.image_rows * s + batch.image_positions]
    return text_win, image_win


def _reference(attn, hidden, image_states, batch, text_keys, base):
    """Dense-mask CASA in float64: every text query vs all text + all image tokens."""
    cfg = attn.config
    s, b, h = hidden.shape
    nh, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    w = attn.linear_qkv.weight.double()
    bias = attn.linear_qkv.bias.double()
    w_out = attn.linear_proj.weight.double()

    def qkv(x):  # [n, h] -> q [n, nh, d], k/v [n, ng, d] via megatron's grouped layout
        y = (x.double() @ w.T + bias).view(-1, ng, (nh // ng + 2) * d)
        q, k, v = y.split([nh // ng * d, d, d], dim=-1)
        return q.reshape(-1, nh, d), k, v

    text = hidden.transpose(0, 1).reshape(b * s, h)
    counts = (batch.image_grid_hw[:, 0] * batch.image_grid_hw[:, 1]) // 4
    n_img = int(counts.sum())
    images = image_states.reshape(-1, h)[:n_img]
    q, k_t, v_t = qkv(text)
    _, k_i, v_i = qkv(images)
    pos = batch.position_ids.flatten()
    q, k_t = _rope(q, pos, base), _rope(k_t, pos, base)
    text_win, image_win = _window_ids(batch)
    img_token_win = image_win.repeat_interleave(counts)
    img_token_pos = pos[(batch.image_rows * s + batch.image_positions).repeat_interleave(counts)]
    k_i = _rope(k_i, img_token_pos, base)
    seq_idx = torch.arange(b * s)
    allowed_text = (text_win[:, None] == text_win[None]) & (seq_idx[None] <= seq_idx[:, None])
    allowed_img = text_win[:, None] == img_token_win[None]
    if not text_keys:
        allowed_text = torch.zeros_like(allowed_text)
    keys = torch.cat([k_i, k_t]).repeat_interleave(nh // ng, dim=1)  # [n_keys, nh, d]
    vals = torch.cat([v_i, v_t]).repeat_interleave(nh // ng, dim=1)
    allowed = torch.cat([allowed_img, allowed_text], dim=1)  # [t, n_keys]
    scores = torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(d)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no key -> zero output
    out = torch.einsum("hqk,khd->qhd", probs, vals).reshape(b * s, nh * d)
    out = (out @ w_out.T).view(b, s, h).transpose(0, 1)
    return out


def _attention_vs_reference(rank, world, fusion, text_keys):
    model = _build(**fusion)
    batch = random_batch(3)
    attn = model.casa_layers()[0].casa_attention
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    hidden = torch.randn(SEQ, 2, 32, generator=g, requires_grad=True)
    images = torch.randn(IMAGE_SLOTS, 2, 32, generator=g, requires_grad=True)
    vision = model.vision_context(batch)
    out, _ = attn(hidden, images, vision)
    ref = _reference(attn, hidden, images, batch, text_keys, model.model_config.lm.rotary_base)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    cot = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * cot).sum(), [hidden, images, attn.linear_qkv.weight])
    ref_grads = torch.autograd.grad((ref * cot.double()).sum(), [hidden, images, attn.linear_qkv.weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    if not text_keys:  # row 1 starts with a text-only window: exactly zero output there
        assert out[:5, 1].abs().max() == 0
    return float((out.double() - ref).abs().max())


@pytest.mark.parametrize("mechanism", ["casa", "cross_attention"])
def test_casa_attention_module_matches_dense_reference(mechanism):
    """Projections, RoPE (text and image keys), windows and GQA of the megatron module vs a
    dense-mask float64 reference: forward and gradients (input, images, QKV weight)."""
    err, = run_distributed(_attention_vs_reference, world_size=1,
                           fusion=dict(mechanism=mechanism), text_keys=mechanism == "casa")
    assert err < 1e-5


def _placements(rank, world):
    out = {}
    for name, fusion in PLACEMENTS.items():
        model = _build(**fusion)
        batch = random_batch(4)
        loss = (model(batch) * batch.loss_mask).sum()
        loss.backward()
        layers = model.casa_layers()
        casa_params = [p for l in layers for p in l.casa_attention.parameters()]
        info = {"layers": [l.layer_number - 1 for l in layers], "loss": loss.item(),
                "n_casa_params": sum(p.numel() for p in casa_params),
                "casa_grads_nonzero": all(p.grad is not None and p.grad.abs().sum() > 0 for p in casa_params),
                "vision_grad": model.vision.patch_embed.weight.grad.abs().sum().item()}
        if fusion.get("placement", "parallel") != "replace" and not fusion.get("share_projections"):
            for layer in layers:  # fresh CASA weights equal their SA source
                sa, casa = layer.self_attention, layer.casa_attention
                assert torch.equal(casa.linear_qkv.weight, sa.linear_qkv.weight)
                assert torch.equal(casa.linear_qkv.bias, sa.linear_qkv.bias)
                assert torch.equal(casa.linear_proj.weight, sa.linear_proj.weight)
                assert torch.equal(layer.casa_layernorm.weight, layer.input_layernorm.weight)
                assert casa.linear_qkv.weight.data_ptr() != sa.linear_qkv.weight.data_ptr()
        if fusion.get("share_projections"):
            for layer in layers:
                assert layer.casa_attention.projections[0] is layer.self_attention.linear_qkv
        out[name] = info
    return out


def test_every_placement_builds_runs_and_inits_from_self_attention():
    info, = run_distributed(_placements, world_size=1)
    assert info["parallel"]["layers"] == [0, 1, 2, 3]
    assert info["before"]["layers"] == [1, 3]
    assert info["replace_every_2"]["layers"] == [1, 3]
    assert info["shared"]["n_casa_params"] == 0  # no new projection weights
    assert info["parallel"]["n_casa_params"] > 0
    for name, item in info.items():
        assert math.isfinite(item["loss"]) and item["vision_grad"] > 0, name
        if name != "shared":
            assert item["casa_grads_nonzero"], name


def _perturb_one_image(rank, world):
    model = _build()
    batch = random_batch(6)
    layer = model.casa_layers()[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQ, 2, 32, generator=g)
    images = torch.randn(IMAGE_SLOTS, 2, 32, generator=g)
    vision = model.vision_context(batch)
    with torch.no_grad():
        base = layer(hidden, images, vision)
        # image 2 (row 0, inserted at 9, 4 tokens) occupies flat image rows 3..6
        flat = images.clone().reshape(-1, 32)
        flat[3:7] += 1.0
        moved = layer(hidden, flat.view_as(images), vision)
    changed = (moved - base).abs().amax(dim=-1) > 1e-6  # [s, b]
    return changed


def test_perturbing_one_image_changes_only_its_window():
    changed, = run_distributed(_perturb_one_image, world_size=1)
    expected = torch.zeros(SEQ, 2, dtype=torch.bool)
    expected[9:, 0] = True  # row 0's window opened at position 9 runs to the end of the row
    assert torch.equal(torch.from_numpy(changed), expected), changed.T


def _rms_norm(x, weight, eps):  # from its definition, not the module under test
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _image_norm(rank, world):
    """Layer(x, images) with image normalisation == the same layer without it fed N(images),
    N the placement's pre-CASA norm (N2 for parallel/before, N1 for replace) with distinct weights."""
    out = {}
    for name in ("parallel", "before", "replace_every_2", "cross_attention"):
        model = _build(**PLACEMENTS[name])
        batch = random_batch(8)
        layer = model.casa_layers()[0]
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for norm in (layer.input_layernorm, getattr(layer, "casa_layernorm", None)):
                if norm is not None:
                    norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        hidden = torch.randn(SEQ, 2, 32, generator=g)
        images = 0.01 * torch.randn(IMAGE_SLOTS, 2, 32, generator=g)  # projector-like scale
        vision = model.vision_context(batch)
        casa_norm = layer.input_layernorm if layer.placement == "replace" else layer.casa_layernorm
        with torch.no_grad():
            assert layer.normalize_images
            normalised = layer(hidden, images, vision)
            layer.normalize_images = False
            raw = layer(hidden, images, vision)
            by_hand = layer(hidden, _rms_norm(images, casa_norm.weight, casa_norm.eps).float(), vision)
        out[name] = (float((normalised - by_hand).abs().max()), float((normalised - raw).abs().max()))
    return out


def test_image_tokens_use_the_placements_pre_casa_norm():
    """``fusion.normalize_images`` (default): image tokens get the CASA layer's own pre-attention
    RMSNorm, like the text; switching it off feeds the projector output raw (a different layer)."""
    errors, = run_distributed(_image_norm, world_size=1)
    for name, (err, effect) in errors.items():
        assert err < 1e-5, (name, err)
        assert effect > 1e-3, (name, effect)

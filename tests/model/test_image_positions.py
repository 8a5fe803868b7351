"""Image-key positions that see frame order (issue 9 item 3).

With ``mrope`` image keys carry (temporal, height, width) positions relative to their window,
so swapping two frames that share a window, or transposing an image's token layout, changes
the output; with the ``insertion`` scheme every image key of a window has the same position,
so both are invisible (the softmax over a window's keys does not depend on their order).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, SEQ, VOCAB, small_model_config


def _two_frames_one_window(swap: bool):
    g = torch.Generator().manual_seed(0)
    frames = [torch.randn(8, 3 * 14 * 14, generator=g) for _ in range(2)]
    if swap:
        frames = frames[::-1]
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    from casa_megatron.model.batch import VLMBatch

    return VLMBatch(input_ids=ids, position_ids=torch.arange(SEQ)[None], pixel_patches=torch.cat(frames),
                    image_grid_hw=torch.tensor([[2, 4], [2, 4]]), image_rows=torch.tensor([0, 0]),
                    image_positions=torch.tensor([2, 2]))


def _build(scheme: str):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from support.vlm import perturbed_full_state

    initialize_parallel(1, 1, seed=0)
    cfg = small_model_config(image_position_scheme=scheme)
    # head_dim 32: the default split gives the row and column 6 frequency pairs each (at head_dim 8
    # they would get one slow pair, and a 4-token grid would barely turn it)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, kv_channels=32))
    model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
    load_full_state(model, perturbed_full_state(model), 0, 1)
    return model


def _effects(rank, world, scheme):
    model = _build(scheme)
    with torch.no_grad():
        frame_effect = (model(_two_frames_one_window(False)) - model(_two_frames_one_window(True))).abs().max()
        # The same image tokens laid out as a 2x4 grid and as its 4x2 transpose.
        batch = dataclasses.replace(_two_frames_one_window(False), image_grid_hw=torch.tensor([[4, 8]]),
                                    image_rows=torch.tensor([0]), image_positions=torch.tensor([2]),
                                    pixel_patches=torch.zeros(32, 3 * 14 * 14))
        transposed = dataclasses.replace(batch, image_grid_hw=torch.tensor([[8, 4]]))
        g = torch.Generator().manual_seed(3)
        hidden = torch.randn(SEQ, 1, 32, generator=g)
        tokens = torch.randn(2, 4, 32, generator=g)  # merged-token grid [2, 4]
        images = torch.zeros(IMAGE_SLOTS, 1, 32)
        images_t = images.clone()
        images[:8, 0] = tokens.reshape(8, 32)
        images_t[:8, 0] = tokens.transpose(0, 1).reshape(8, 32)  # [4, 2] row-major
        attn = model.casa_layers()[0].casa_attention
        attn.linear_qkv.weight.mul_(8)  # sharp attention: scores far from uniform, so phases matter
        out, _ = attn(hidden, images, model.vision_context(batch))
        out_t, _ = attn(hidden, images_t, model.vision_context(transposed))
    return frame_effect.item(), ((out - out_t).abs().max() / out.abs().max()).item()


@pytest.mark.parametrize("scheme", ["insertion", "mrope"])
def test_frame_order_and_layout_visible_only_with_mrope(scheme):
    frame_effect, layout_effect = run_distributed(_effects, world_size=1, scheme=scheme)[0]
    if scheme == "insertion":
        assert frame_effect < 1e-5 and layout_effect < 1e-5
    else:
        assert frame_effect > 1e-3 and layout_effect > 1e-2, (frame_effect, layout_effect)


def test_auto_scheme_follows_the_encoder():
    from casa_megatron.config import FusionConfig

    assert FusionConfig().resolved_image_position_scheme("qwen2_5_vl") == "mrope"
    assert FusionConfig().resolved_image_position_scheme("tiny_vit") == "insertion"
    assert FusionConfig(image_position_scheme="none").resolved_image_position_scheme("qwen2_5_vl") == "none"

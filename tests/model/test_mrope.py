"""Multimodal RoPE: our positions from the batch structure equal transformers' get_rope_index
(images and video with second_per_grid_ts, packed samples), and our phases equal transformers'
Qwen2.5-VL rotary embedding (mrope_section [16, 24, 24]); the default section split."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from support.dist import run_distributed

from casa_megatron.config import LanguageModelConfig
from casa_megatron.model.batch import VLMBatch
from casa_megatron.model.insertion import build_insertion_layout
from casa_megatron.model.mrope import insertion_positions, mrope_freqs, temporal_steps
from casa_megatron.model.rope import PositionRotary
from casa_megatron.model.vision import tokens_per_image

IMAGE, VIDEO = 7, 8  # token ids standing for image / video tokens in the HF input
TOKENS_PER_SECOND = 2.0


def _batch() -> VLMBatch:
    """Row 0: an image at 3 and a 3-temporal-patch video (1.5 s per patch) at 9.
    Row 1, two packed samples: an image at 2 | a video at 7 (0.5 s per patch) and an image at 11."""
    b, s = 2, 16
    positions = torch.arange(s).repeat(b, 1)
    positions[1, 5:] -= 5
    starts = torch.zeros(b, s, dtype=torch.bool)
    starts[1, 5] = True
    return VLMBatch(
        input_ids=torch.randint(10, 100, (b, s), generator=torch.Generator().manual_seed(0)),
        position_ids=positions, pixel_patches=torch.zeros(0, 1),
        image_grid_hw=torch.tensor([[4, 6], [4, 8], [6, 4], [4, 4], [8, 2]]),
        image_grid_t=torch.tensor([1, 3, 1, 2, 1]),
        image_second_per_grid=torch.tensor([0.0, 1.5, 0.0, 0.5, 0.0]),
        image_rows=torch.tensor([0, 0, 1, 1, 1]), image_positions=torch.tensor([3, 9, 2, 7, 11]),
        sample_starts=starts,
    )


def _hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32,
                           tokens_per_second=int(TOKENS_PER_SECOND)),
        image_token_id=IMAGE, video_token_id=VIDEO)
    return Qwen2_5_VLModel(cfg)


def test_insertion_positions_equal_get_rope_index():
    batch = _batch()
    b, s = batch.shape
    grid = batch.image_grid_thw
    counts = tokens_per_image(grid)
    si = 32
    layout = build_insertion_layout(b, s, si, batch.image_rows, batch.image_positions, counts,
                                     batch.position_ids, batch.sample_starts)
    steps = temporal_steps(grid, batch.image_second_per_grid, TOKENS_PER_SECOND)
    ours = insertion_positions(grid, batch.image_rows, batch.image_positions, batch.position_ids,
                               batch.sample_starts, layout.text_index, layout.image_index, layout.length, 2, steps)

    # The same streams as HF input_ids: text, then IMAGE / VIDEO tokens where images sit.
    is_video = batch.image_second_per_grid > 0
    kind = torch.zeros(b * layout.length, dtype=torch.long)
    kind[layout.image_index] = torch.repeat_interleave(torch.where(is_video, 2, 1), counts)
    kind = kind.view(b, layout.length)
    image_of_token = torch.full((b * layout.length,), -1)
    image_of_token[layout.image_index] = torch.repeat_interleave(torch.arange(len(counts)), counts)
    image_of_token = image_of_token.view(b, layout.length)
    hf = _hf_model()
    checked = 0
    for row in range(b):
        for seg in layout.segment_ids[row].unique().tolist():
            if seg < 0:
                continue
            cols = (layout.segment_ids[row] == seg).nonzero().squeeze(1)
            types = kind[row, cols]
            images = image_of_token[row, cols].unique()
            images = images[images >= 0].tolist()
            still = [k for k in images if not is_video[k]]
            clips = [k for k in images if is_video[k]]
            ids = torch.where(types == 2, VIDEO, torch.where(types == 1, IMAGE, 50))
            expected, _ = hf.get_rope_index(
                ids[None], mm_token_type_ids=types[None].int(),
                image_grid_thw=grid[still] if still else None, video_grid_thw=grid[clips] if clips else None,
                second_per_grid_ts=batch.image_second_per_grid[clips] if clips else None)
            torch.testing.assert_close(ours[:, row, cols], expected[:, 0], rtol=0, atol=0)
            checked += cols.numel()
    assert checked == int((layout.segment_ids >= 0).sum()) == b * s + int(counts.sum())


def _rotary(head_dim: int):
    return PositionRotary(SimpleNamespace(use_cpu_initialization=True), head_dim, 10000.0)


def _phases_vs_transformers(rank, world):
    from transformers import Qwen2_5_VLConfig

    from casa_megatron.compat import enable_cpu_compat

    enable_cpu_compat()  # megatron's RotaryEmbedding asks for the CUDA device
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    cfg = Qwen2_5_VLConfig(text_config=dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [16, 24, 24]}))
    positions = torch.randint(0, 500, (3, 2, 11), generator=torch.Generator().manual_seed(1))
    hf_cos, hf_sin = Qwen2_5_VLRotaryEmbedding(cfg.text_config)(torch.zeros(1), positions)  # [b, L, 128]
    section = LanguageModelConfig(hidden_size=256, num_attention_heads=2, num_query_groups=1).resolved_mrope_section
    assert section == [16, 24, 24]  # the default split at head_dim 128 is Qwen2.5-VL's
    ours = mrope_freqs(_rotary(128), positions, section)[..., 0, :]  # [b, L, 128]
    torch.testing.assert_close(ours.cos(), hf_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sin(), hf_sin, rtol=1e-5, atol=1e-5)
    # text: equal positions on the three axes -> exactly the backbone's 1-D RoPE
    text = torch.arange(9)
    torch.testing.assert_close(mrope_freqs(_rotary(128), text.expand(3, -1), section), _rotary(128)(text))
    return True


def test_mrope_phases_equal_transformers_rotary():
    assert run_distributed(_phases_vs_transformers, world_size=1) == [True]


def test_default_mrope_section_any_head_dim():
    for head_dim in (8, 16, 24, 64, 80, 96, 128, 256):
        lm = LanguageModelConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_query_groups=1)
        t, h, w = lm.resolved_mrope_section
        assert t + h + w == head_dim // 2 and h == w and t > 0


def test_casa_image_positions_follow_the_window_and_time():
    """Written out from the definition: key = window start + (t, row, column) in merged tokens;
    the images of one window follow each other in time (a clip steps by tokens_per_second * s)."""
    from casa_megatron.model.mrope import casa_image_positions

    grid = torch.tensor([[1, 2, 4], [2, 2, 2], [1, 4, 2]])  # still, clip (1.5 s per patch), still
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([3, 3, 1])
    position_ids = torch.arange(8).repeat(2, 1) + torch.tensor([[10], [20]])  # window starts 13 and 21
    steps = temporal_steps(grid, torch.tensor([0.0, 1.5, 0.0]), TOKENS_PER_SECOND)
    got = casa_image_positions(grid, rows, positions, position_ids, 2, steps)
    want = []
    for start, t_first, (t_n, h_n, w_n), step in ((13, 0, (1, 1, 2), 1.0), (13, 1, (2, 1, 1), 3.0),
                                                   (21, 0, (1, 2, 1), 1.0)):
        for t in range(t_n):
            for h in range(h_n):
                for w in range(w_n):
                    want.append((start + t_first + int(t * step), start + h, start + w))
    assert got.T.tolist() == [list(p) for p in want]

"""``image_position_scheme='mrope'`` in the remote code: Qwen2.5-VL's multimodal RoPE for image
keys at ``window start + (t, row, column)``; frame order inside a window becomes visible."""

from __future__ import annotations

import torch

from casa_megatron.hf.remote.configuration_casa import CasaConfig
from casa_megatron.hf.remote.layers_casa import Rotary
from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM, image_key_positions

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, image_token_id=4, mrope_section=[4, 6, 6],
             vision_config=dict(hidden_size=32, num_heads=2, intermediate_size=48))


def test_multimodal_cos_sin_equals_qwen2_5_vl():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    ref = Qwen2_5_VLRotaryEmbedding(Qwen2_5_VLTextConfig(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}))
    ours = Rotary(CasaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    pos = torch.randint(0, 50, (3, 1, 9))
    cos_ref, sin_ref = ref(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = ours.cos_sin_multimodal(pos[:, 0], [4, 6, 6], torch.float32)
    torch.testing.assert_close(cos, cos_ref[0]), torch.testing.assert_close(sin, sin_ref[0])
    same = torch.full((3, 5), 7)  # t = h = w: plain 1-D RoPE, in both layouts
    for family in ("qwen2", "helium"):
        rope = Rotary(CasaConfig(**SMALL, lm_family=family))
        torch.testing.assert_close(rope.cos_sin_multimodal(same, [4, 6, 6], torch.float32),
                                   rope.cos_sin(same[0], torch.float32))


def test_positions_are_window_start_plus_time_row_column():
    cfg = CasaConfig(**SMALL, image_position_scheme="mrope")
    pos = image_key_positions(cfg, 5, [[1, 4, 6], [1, 2, 2]], "cpu")
    t = [0] * 6 + [1]
    rows = [0, 0, 0, 1, 1, 1, 0]
    cols = [0, 1, 2, 0, 1, 2, 0]
    assert pos.tolist() == [[5 + x for x in t], [5 + x for x in rows], [5 + x for x in cols]]


def test_frame_order_is_visible_with_mrope_only():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 7, 4, 4, 8, 9, 10]])  # two frames in one window at position 2
    frames = [torch.randn(16, 588), torch.randn(16, 588)]
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    results = {}
    for scheme in ("mrope", "insertion"):
        torch.manual_seed(1)
        model = CasaForCausalLM(CasaConfig(**SMALL, image_position_scheme=scheme)).eval()
        with torch.no_grad():
            a = model(input_ids=ids, pixel_values=torch.cat(frames), image_grid_thw=grid).logits
            b = model(input_ids=ids, pixel_values=torch.cat(frames[::-1]), image_grid_thw=grid).logits
        results[scheme] = (a[0, 2:] - b[0, 2:]).abs().max().item()
    assert results["insertion"] < 1e-5  # same rotation for every image key: order is invisible
    assert results["mrope"] > 1e-4

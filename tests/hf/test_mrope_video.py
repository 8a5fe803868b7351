"""The remote code's ``mrope`` image-key positions for video clips equal the megatron model's:
Qwen2.5-VL encoder (frame pairs), a still image and a 2-temporal-patch clip sharing a window, a
3-temporal-patch clip in the next; temporal positions step by ``tokens_per_second x seconds per
temporal patch``. Positions and logits (fp32, <= 1e-4) are compared for two clip durations,
whose positions differ (so the step is seen, not assumed)."""

from __future__ import annotations

import torch
from support.dist import run_distributed

IMG = 4
IDS = [[2, 9, IMG, IMG, 10, 11, 12, IMG, 13, 14, 15, 16]]  # windows at 2 (image + clip) and 7 (clip)
GRID = [[1, 4, 4], [2, 4, 2], [3, 2, 4]]  # [t, h, w] patches: an image, a 2-pair clip, a 3-pair clip
ROWS, POSITIONS = [0, 0, 0], [2, 2, 7]


def _patches(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in GRID)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g)


def _batch(seconds: float):
    from casa_megatron.model.batch import VLMBatch

    grid = torch.tensor(GRID)
    return VLMBatch(input_ids=torch.tensor(IDS), position_ids=torch.arange(len(IDS[0]))[None],
                    pixel_patches=_patches(), image_grid_hw=grid[:, 1:], image_grid_t=grid[:, 0],
                    image_second_per_grid=torch.tensor([0.0, seconds, seconds]),
                    image_rows=torch.tensor(ROWS), image_positions=torch.tensor(POSITIONS))


def _megatron(rank, world, out_dir):
    from pathlib import Path

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.mrope import casa_image_positions, temporal_steps
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from support.export import export_megatron
    from support.hf_fixture import tiny_tokenizer
    from support.vlm import QWEN_VISION, VOCAB, perturbed_full_state, small_model_config

    initialize_parallel(1, 1, seed=0)
    # an unpadded MLP width: the perturbation below would make padded FFN units non-zero
    cfg = small_model_config(vision={**QWEN_VISION, "ffn_hidden_size": 48}, image_position_scheme="mrope")
    model = build_vlm(cfg, ParallelConfig(), image_seq_length=64)
    load_full_state(model, perturbed_full_state(model), 0, 1)
    model.eval()
    result = {}
    for seconds in (1.0, 0.5):
        batch = _batch(seconds)
        steps = temporal_steps(batch.image_grid_thw, batch.image_second_per_grid, cfg.vision.tokens_per_second)
        with torch.no_grad():
            logits = model(batch).transpose(0, 1)[..., :cfg.lm.vocab_size].contiguous()
        positions = casa_image_positions(batch.image_grid_thw, batch.image_rows, batch.image_positions,
                                         batch.position_ids, cfg.vision.spatial_merge_size, steps)
        result[seconds] = (logits, positions)
    out_dir = Path(out_dir)
    export_megatron(model, cfg, out_dir, tiny_tokenizer(out_dir.parent / "tokenizer", VOCAB), image_token_id=IMG)
    return result


def test_video_positions_and_logits_equal_megatron(tmp_path):
    from transformers import AutoModelForCausalLM

    from casa_megatron.hf.remote.modeling_casa import image_key_positions, temporal_steps

    reference = run_distributed(_megatron, world_size=1, out_dir=str(tmp_path / "hf"))[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert model.config.image_position_scheme == "mrope" and model.config.vision_config["encoder"] == "qwen2_5_vl"
    reference = {s: tuple(torch.as_tensor(x) for x in v) for s, v in reference.items()}
    for seconds, (logits, positions) in reference.items():
        seconds_per_grid = torch.tensor([0.0, seconds, seconds])
        steps = temporal_steps(model.config, 3, seconds_per_grid)
        ours = torch.cat([image_key_positions(model.config, 2, GRID[:2], "cpu", steps[:2]),
                          image_key_positions(model.config, 7, GRID[2:], "cpu", steps[2:])], dim=1)
        assert torch.equal(ours, positions), seconds
        with torch.no_grad():
            out = model(input_ids=torch.tensor(IDS), pixel_values=_patches(), image_grid_thw=torch.tensor(GRID),
                        second_per_grid_ts=seconds_per_grid, use_cache=False).logits
        torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-4, msg=lambda m: f"{seconds} s: {m}")
    assert not torch.equal(reference[1.0][1], reference[0.5][1])  # the step is visible in the positions...
    assert (reference[1.0][0] - reference[0.5][0])[0, 2:].abs().max() > 1e-4  # ... and in the logits

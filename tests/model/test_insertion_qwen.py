"""The insertion baseline built from a Qwen2.5-VL checkpoint *is* Qwen2.5-VL: its text logits
equal ``Qwen2_5_VLForConditionalGeneration``'s on image + text and video + text inputs (fp32,
TP=1 and TP=2), with multimodal RoPE positions computed from the batch structure."""

from __future__ import annotations

import pytest
import torch
from support.dist import run_distributed
from support.qwen_vl import IMAGE_ID, VIDEO_ID, hf_qwen_vl, model_config, to_megatron

IMAGE_SLOTS = 16


def _batch(patch_dim: int):
    """Row 0: an image at 3, a 4-frame video (2 temporal patches, 1 s each) at 8.
    Row 1: an image at 2 and another at 6."""
    from casa_megatron.model.batch import VLMBatch

    g = torch.Generator().manual_seed(0)
    grid_t = torch.tensor([1, 2, 1, 1])
    grid_hw = torch.tensor([[4, 6], [4, 4], [6, 4], [4, 4]])
    n = int((grid_t * grid_hw.prod(1)).sum())
    return VLMBatch(input_ids=torch.randint(0, 100, (2, 12), generator=g),
                    position_ids=torch.arange(12).repeat(2, 1),
                    pixel_patches=torch.randn(n, patch_dim, generator=g), image_grid_hw=grid_hw,
                    image_grid_t=grid_t, image_second_per_grid=torch.tensor([0.0, 1.0, 0.0, 0.0]),
                    image_rows=torch.tensor([0, 0, 1, 1]), image_positions=torch.tensor([3, 8, 2, 6]))


def _hf_logits(hf, model, batch):
    """The same streams as HF inputs: image / video placeholder ids where our images sit."""
    layout = model.layout(batch)
    b, s = batch.shape
    grid = batch.image_grid_thw
    counts = grid.prod(1) // 4
    video = batch.image_second_per_grid > 0
    ids = torch.zeros(b * layout.length, dtype=torch.long)
    types = torch.zeros(b * layout.length, dtype=torch.int)
    ids[layout.text_index] = batch.input_ids.reshape(-1)
    ids[layout.image_index] = torch.repeat_interleave(torch.where(video, VIDEO_ID, IMAGE_ID), counts)
    types[layout.image_index] = torch.repeat_interleave(torch.where(video, 2, 1), counts).int()
    mask = (layout.segment_ids >= 0).long()  # stream padding at the end of a row
    patches = torch.split(batch.pixel_patches, grid.prod(1).tolist())
    with torch.no_grad():
        out = hf(input_ids=ids.view(b, -1), attention_mask=mask, mm_token_type_ids=types.view(b, -1),
                 pixel_values=torch.cat([p for p, v in zip(patches, video) if not v]),
                 image_grid_thw=grid[~video],
                 pixel_values_videos=torch.cat([p for p, v in zip(patches, video) if v]),
                 video_grid_thw=grid[video], second_per_grid_ts=batch.image_second_per_grid[video])
    logits = out.logits.reshape(b * layout.length, -1)[layout.text_index]  # [b*s, v]
    return logits.view(b, s, -1).transpose(0, 1)  # [s, b, v]


def _worker(rank, world):
    from megatron.core import parallel_state, tensor_parallel

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state

    hf = hf_qwen_vl()
    cfg = model_config(hf)
    initialize_parallel(world, 1, seed=0)
    model = build_vlm(cfg, ParallelConfig(tensor_model_parallel_size=world), image_seq_length=IMAGE_SLOTS)
    full = to_megatron(hf, cfg)
    assert sorted(full) == sorted(n for n, _ in model.named_parameters())  # every parameter written
    load_full_state(model, full, parallel_state.get_tensor_model_parallel_rank(), world)
    batch = _batch(cfg.vision.patch_dim)
    assert model.image_position_scheme == "mrope"  # the default with the Qwen2.5-VL encoder
    with torch.no_grad():
        ours = tensor_parallel.gather_from_tensor_model_parallel_region(model(batch))  # [s, b, v]
    ref = _hf_logits(hf, model, batch)
    err = (ours - ref).abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    return err, ref.abs().max().item()


@pytest.mark.parametrize("tp", [1, 2])
def test_insertion_equals_qwen2_5_vl(tp):
    errors = run_distributed(_worker, world_size=tp)
    assert all(err < 1e-4 for err, _ in errors)

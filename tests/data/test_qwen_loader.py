"""Real shards through the loader with the Qwen2.5-VL patch layout: still images repeated to two
frames, the frames of a clip that share a window grouped in pairs; the batches drive the VLM
with the Qwen2.5-VL encoder (forward, loss, backward)."""

from __future__ import annotations

import torch
from support.dist import run_distributed
from support.vlm import QWEN_VISION, train_on_batches

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator

IMAGE_SLOTS = 160


def test_qwen_patches_from_real_shards_train_the_model(tiny_dataset):
    cfg = DataConfig(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=IMAGE_SLOTS,
                     num_workers=0, pack_buffer=10, log_interval=0, window_per_frame=False,
                     temporal_patch_size=2, shuffle=False)
    it = make_train_iterator(cfg, 2, 0, 1, seed=0)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert b.pixel_patches.shape == (int(b.image_grid_thw.prod(1).sum()), 3 * 2 * 14 * 14)
    grid_t = torch.cat([b.image_grid_t for b in batches])
    seconds = torch.cat([b.image_second_per_grid for b in batches])
    assert (grid_t > 1).any() and (grid_t == 1).any()  # clips in pairs and still images
    assert bool((seconds[grid_t > 1] > 0).all())  # clips carry their seconds per temporal patch
    (losses, _, vision_grad), = run_distributed(train_on_batches, world_size=1, batches=batches,
                                                image_slots=IMAGE_SLOTS, vision=QWEN_VISION)
    assert all(torch.isfinite(torch.tensor(losses))) and vision_grad > 0

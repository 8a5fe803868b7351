"""Loader batches drive the real CASA VLM: forward, masked loss and backward on CPU."""

from __future__ import annotations

import torch
from support.dist import run_distributed
from support.vlm import train_on_batches

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator

IMAGE_SLOTS = 160


def test_packed_real_batches_train_the_model(tiny_dataset):
    cfg = DataConfig(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=IMAGE_SLOTS,
                     num_workers=0, pack_buffer=10, log_interval=0)
    it = make_train_iterator(cfg, 2, 0, 1, seed=0)
    batches = [next(it) for _ in range(2)]
    assert any(b.image_rows.numel() for b in batches)
    (losses, projector_grad, _), = run_distributed(train_on_batches, world_size=1, batches=batches,
                                                   image_slots=IMAGE_SLOTS)
    assert all(torch.isfinite(torch.tensor(losses))) and all(l > 0 for l in losses)
    assert projector_grad > 0  # the image path receives gradient from answer tokens

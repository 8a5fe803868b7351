"""Loader batches drive the real CASA VLM: forward, masked loss and backward on CPU."""

from __future__ import annotations

import dataclasses

import torch
from support.dist import run_distributed
from support.vlm import small_model_config

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator

IMAGE_SLOTS = 160


def _step(rank, world, batches):
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.step import masked_mean

    initialize_parallel(1, 1, seed=0)
    cfg = small_model_config()
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=512))
    model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
    losses = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = masked_mean(model(batch), batch)
        loss.backward()
        losses.append(float(loss))
    projector_grad = sum(float(p.grad.abs().sum()) for p in model.projector.parameters() if p.grad is not None)
    return losses, projector_grad


def test_packed_real_batches_train_the_model(tiny_dataset):
    cfg = DataConfig(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=IMAGE_SLOTS,
                     num_workers=0, pack_buffer=10, log_interval=0)
    it = make_train_iterator(cfg, 2, 0, 1, seed=0)
    batches = [next(it) for _ in range(2)]
    assert any(b.image_rows.numel() for b in batches)
    (losses, projector_grad), = run_distributed(_step, world_size=1, batches=batches)
    assert all(torch.isfinite(torch.tensor(losses))) and all(l > 0 for l in losses)
    assert projector_grad > 0  # the image path receives gradient from answer tokens

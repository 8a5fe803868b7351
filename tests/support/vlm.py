"""A small CASA VLM config and random packed batches with every window situation."""

from __future__ import annotations

import torch

from casa_megatron.config import FusionConfig, LanguageModelConfig, ModelConfig, VisionConfig
from casa_megatron.model.batch import VLMBatch

SEQ, IMAGE_SLOTS, VOCAB = 16, 16, 128


# A tiny Qwen2.5-VL encoder: odd MLP width padded to 48 (splits over TP=2), 28 px windows (one merge
# group each) in block 0, full attention in block 1.
QWEN_VISION = dict(encoder="qwen2_5_vl", temporal_patch_size=2, ffn_hidden_size=45, ffn_pad_multiple=8,
                   fullatt_block_indexes=[1], window_size=28)


def small_model_config(vision: dict | None = None, **fusion) -> ModelConfig:
    return ModelConfig(
        lm=LanguageModelConfig(vocab_size=VOCAB, num_layers=4, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, ffn_hidden_size=48, add_qkv_bias=True),
        vision=VisionConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=48),
                               **(vision or {})}),
        fusion=FusionConfig(**fusion),
        transformer_impl="local",
    )


def random_batch(seed: int, with_labels: bool = True, temporal: int = 1) -> VLMBatch:
    """b=2, s=16. Row 0: two consecutive images at 0 (shared window), one at 9.
    Row 1: leading text-only window, an image at 5, a packed second sample from 8, an image at 11.
    ``temporal`` > 1 (Qwen2.5-VL patches): the second image is a 2-temporal-patch clip."""
    g = torch.Generator().manual_seed(seed)
    b = 2
    grid = torch.tensor([[2, 4], [2, 2], [4, 4], [2, 2], [2, 4]])
    grid_t = torch.tensor([1, 2, 1, 1, 1]) if temporal > 1 else None
    n_patches = int((grid[:, 0] * grid[:, 1] * (1 if grid_t is None else grid_t)).sum())
    positions = torch.arange(SEQ).repeat(b, 1)
    positions[1, 8:] -= 8
    sample_starts = torch.zeros(b, SEQ, dtype=torch.bool)
    sample_starts[1, 8] = True
    return VLMBatch(
        input_ids=torch.randint(0, VOCAB, (b, SEQ), generator=g),
        position_ids=positions,
        pixel_patches=torch.randn(n_patches, 3 * temporal * 14 * 14, generator=g),
        image_grid_hw=grid,
        image_grid_t=grid_t,
        image_second_per_grid=None if grid_t is None else torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
        image_rows=torch.tensor([0, 0, 0, 1, 1]),
        image_positions=torch.tensor([0, 0, 9, 5, 11]),
        labels=torch.randint(0, VOCAB, (b, SEQ), generator=g) if with_labels else None,
        loss_mask=(torch.rand(b, SEQ, generator=g) > 0.3).float(),
        sample_starts=sample_starts,
    )


def without_images(batch: VLMBatch) -> VLMBatch:
    """The same micro-batch with every image removed (text-only samples packed together)."""
    import dataclasses

    return dataclasses.replace(
        batch, pixel_patches=batch.pixel_patches[:0], image_grid_hw=batch.image_grid_hw[:0],
        image_grid_t=None if batch.image_grid_t is None else batch.image_grid_t[:0],
        image_second_per_grid=None if batch.image_second_per_grid is None else batch.image_second_per_grid[:0],
        image_rows=batch.image_rows[:0], image_positions=batch.image_positions[:0])


def perturbed_full_state(model, seed: int = 7, scale: float = 0.05):
    """The model's full (TP=1) parameters plus noise, so norms and CASA copies are not trivial."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def train_on_batches(rank, world, batches, image_slots: int, vision: dict | None = None):
    """(worker) Forward, masked loss and backward of a small VLM (vocab 512) on each batch:
    (losses, summed |grad| of the projector, of the vision encoder)."""
    import dataclasses

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.step import masked_mean

    initialize_parallel(1, 1, seed=0)
    cfg = small_model_config(vision)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=512))
    model = build_vlm(cfg, ParallelConfig(), image_seq_length=image_slots)
    losses = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = masked_mean(model(batch), batch)
        loss.backward()
        losses.append(float(loss))

    def grad(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    return losses, grad(model.projector), grad(model.vision)

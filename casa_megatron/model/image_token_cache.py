"""The projected image tokens of the last forward, reused by the next forward that sees the same
images: for greedy generation by recomputation (``evaluation/megatron_side.py``).

Without a cache, every generated token runs the whole batch again, the vision encoder included,
on the very same pixels. At Qwen2.5-VL's shape the encoder is most of a forward's FLOPs (77 % of
CASA's training step at the paper's shape: docs/benchmarks.md), so it would dominate generation.
The cache keeps the last forward's encoder input (patches and grid) and its projected tokens; a
forward whose input equals it bit for bit takes the tokens instead of running the encoder and
projector. The same input gives the same computation, so what comes out is exactly what
recomputation gives (tested, float32 and bf16).

Only where autograd is off (a training forward never reuses anything), and only on the stage
that embeds the text and runs the whole encoder (``pre_process`` and ``lm_first``: with the
encoder over several pipeline stages the earlier stages would run their blocks anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from casa_megatron.model.batch import VLMBatch


class ImageTokenCache:
    def __init__(self):
        self._patches: Optional[Tensor] = None  # [n_patches, D] the encoder input of the stored tokens
        self._grid: Optional[Tensor] = None  # [n_images, 3] (t, h, w)
        self._tokens: Optional[Tensor] = None  # [n_tok, h] projector output
        self.hits = self.misses = 0

    @staticmethod
    def _grid_of(batch: VLMBatch) -> Tensor:
        grid_t = batch.image_grid_t if batch.image_grid_t is not None else torch.ones_like(batch.image_grid_hw[:, 0])
        return torch.cat([grid_t.view(-1, 1).to(batch.image_grid_hw), batch.image_grid_hw], dim=1)

    def lookup(self, batch: VLMBatch) -> Optional[Tensor]:
        """The stored tokens if ``batch`` feeds the encoder exactly what produced them, else None
        (always None with autograd on)."""
        if torch.is_grad_enabled():
            return None
        if (self._tokens is not None and torch.equal(self._grid, self._grid_of(batch))
                and self._patches.shape == batch.pixel_patches.shape
                and torch.equal(self._patches, batch.pixel_patches)):
            self.hits += 1
            return self._tokens
        self.misses += 1
        return None

    def store(self, batch: VLMBatch, tokens: Tensor) -> None:
        if torch.is_grad_enabled():
            return
        self._patches, self._grid, self._tokens = batch.pixel_patches, self._grid_of(batch), tokens


@contextmanager
def reused_image_tokens(chunks: Sequence[torch.nn.Module]) -> Iterator[ImageTokenCache]:
    """Within the block, forwards of ``chunks`` (a rank's model chunks) without autograd reuse the
    previous forward's image tokens when their images are the same."""
    cache = ImageTokenCache()
    for chunk in chunks:
        chunk.image_token_cache = cache
    try:
        yield cache
    finally:
        for chunk in chunks:
            chunk.image_token_cache = None

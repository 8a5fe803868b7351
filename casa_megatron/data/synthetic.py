"""A generated visual question task whose answers need the image (the README's main job).

Each sample is ``[BOS, <image>, ASK_COLOUR | ASK_SIDE, answer, EOS]`` with an image inserted
before ``<image>``: a coloured square on a grey canvas. Colour questions have 8 answers, side
questions (left / right half) 2, so a model that ignores the image cannot beat ln 8 / ln 2 on
them, while a CASA model that reads its window's image drives the loss towards 0. Samples are
packed several to a row; every image opens its window; labels exist only on answers.
"""

from __future__ import annotations

import base64
from typing import List

import torch

from casa_megatron.data.patches import image_to_patches
from casa_megatron.model.batch import VLMBatch

COLOURS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                        [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
PAD, BOS, EOS, IMAGE, ASK_COLOUR, ASK_SIDE = 0, 1, 2, 3, 4, 5
COLOUR_TOKENS = list(range(6, 6 + len(COLOURS)))
SIDE_TOKENS = [6 + len(COLOURS), 7 + len(COLOURS)]
VOCAB_SIZE = 8 + len(COLOURS)
SAMPLE_LEN = 5


def _image(colour: int, right: bool, size: int, g: torch.Generator) -> torch.Tensor:
    img = torch.full((3, size, size), 0.5) + 0.05 * torch.randn(3, size, size, generator=g)
    side = size // 2
    top = int(torch.randint(0, size - side + 1, (1,), generator=g))
    left = size - side if right else 0
    img[:, top:top + side, left:left + side] = COLOURS[colour][:, None, None]
    return img


class SyntheticBatches:
    """Endless packed micro-batches; ``seq_length // 5`` samples per row.

    Resumable: ``state_dict()`` holds the generator state (JSON-safe), so a restored iterator
    yields exactly the batches the original would have yielded next.
    """

    def __init__(self, batch_size: int, seq_length: int, image_size: int = 56, seed: int = 0,
                 temporal_patch_size: int = 1):
        self.batch_size, self.seq_length, self.image_size, self.seed = batch_size, seq_length, image_size, seed
        self.temporal_patch_size = temporal_patch_size  # the encoder's frames per patch (image repeated)
        self.per_row = seq_length // SAMPLE_LEN
        if self.per_row < 1:
            raise ValueError(f"seq_length={seq_length} cannot hold one {SAMPLE_LEN}-token sample")
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> VLMBatch:
        batch = _make_batch(self.batch_size, self.seq_length, self.image_size, self.per_row, self.generator,
                            self.temporal_patch_size)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        state = self.generator.get_state().numpy().tobytes()
        return {"kind": "synthetic", "seed": self.seed, "batches": self.batches,
                "generator_state": base64.b64encode(state).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed:
            raise ValueError(f"state is not of a synthetic iterator with seed {self.seed}: "
                             f"kind={state.get('kind')!r}, seed={state.get('seed')!r}")
        raw = base64.b64decode(state["generator_state"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.batches = int(state["batches"])


def synthetic_batches(batch_size: int, seq_length: int, image_size: int = 56,
                      seed: int = 0) -> SyntheticBatches:
    """Endless packed micro-batches; ``seq_length // 5`` samples per row."""
    return SyntheticBatches(batch_size, seq_length, image_size, seed)


def _make_batch(batch_size: int, seq_length: int, image_size: int, per_row: int,
                g: torch.Generator, temporal_patch_size: int = 1) -> VLMBatch:
    ids = torch.full((batch_size, seq_length), PAD, dtype=torch.long)
    labels = torch.full_like(ids, PAD)
    loss_mask = torch.zeros(batch_size, seq_length)
    positions = torch.zeros_like(ids)
    starts = torch.zeros(batch_size, seq_length, dtype=torch.bool)
    patches: List[torch.Tensor] = []
    grids, rows, cols = [], [], []
    for r in range(batch_size):
        for k in range(per_row):
            o = k * SAMPLE_LEN
            colour = int(torch.randint(0, len(COLOURS), (1,), generator=g))
            right = bool(torch.randint(0, 2, (1,), generator=g))
            ask_colour = bool(torch.randint(0, 2, (1,), generator=g))
            answer = COLOUR_TOKENS[colour] if ask_colour else SIDE_TOKENS[int(right)]
            ids[r, o:o + SAMPLE_LEN] = torch.tensor(
                [BOS, IMAGE, ASK_COLOUR if ask_colour else ASK_SIDE, answer, EOS])
            labels[r, o + 2] = answer  # predicted from the question token
            loss_mask[r, o + 2] = 1.0
            positions[r, o:o + SAMPLE_LEN] = torch.arange(SAMPLE_LEN)
            starts[r, o] = True
            p, grid = image_to_patches(_image(colour, right, image_size, g), temporal=temporal_patch_size)
            patches.append(p)
            grids.append(grid)
            rows.append(r)
            cols.append(o + 1)  # the image opens its window at the <image> token
    return VLMBatch(
        input_ids=ids, position_ids=positions, pixel_patches=torch.cat(patches),
        image_grid_hw=torch.tensor(grids), image_rows=torch.tensor(rows),
        image_positions=torch.tensor(cols), labels=labels, loss_mask=loss_mask,
        sample_starts=starts,
    )

"""Image+text and video+text inputs, given both as a megatron ``VLMBatch`` and as HF model inputs.

Token ids follow ``support.hf_fixture.tiny_tokenizer``: 2 = <bos>, 4 = <image>, 6 = <eot>, words
from 7. Images are random pixel patches of small grids (1, 2 or 4 LM tokens each).
"""

from __future__ import annotations

from typing import Dict, List

import torch

BOS, IMG, EOT = 2, 4, 6
VARIANTS = {
    "casa_parallel": dict(),
    "casa_before_unrotated_images": dict(placement="before", image_position_scheme="none"),
    "casa_replace": dict(placement="replace", every_n=2),
    "casa_shared": dict(share_projections=True, layers=[1, 3]),
    "cross_attention": dict(mechanism="cross_attention", every_n=2),
    "cross_attention_gated": dict(mechanism="cross_attention", cross_attention_gate=True, every_n=2),
    "insertion": dict(mechanism="insertion"),
}
IMAGE_SLOTS = 40


def _mrope_variants() -> Dict:
    """Qwen2.5-VL multimodal positions for image keys, where the megatron model has the scheme
    (main after the Qwen2.5-VL encoder work; verified there on a trial merge)."""
    from casa_megatron.config.schema import IMAGE_POSITION_SCHEMES

    if "mrope" not in IMAGE_POSITION_SCHEMES:
        return {}
    return {"casa_mrope": dict(image_position_scheme="mrope"),
            "cross_attention_mrope": dict(mechanism="cross_attention", image_position_scheme="mrope", every_n=2)}


VARIANTS.update(_mrope_variants())


def _rows(kind: str) -> List[List[int]]:
    w = lambda *ids: [7 + i for i in ids]  # noqa: E731
    if kind == "image":  # two rows: text-only leading window, an image, two images sharing a window
        return [[BOS, *w(1, 2), IMG, *w(3, 4, 5, 6), IMG, IMG, *w(7, 8, 9), EOT, *w(10, 11)],
                [BOS, IMG, *w(12, 13, 14), EOT, *w(15), IMG, *w(16, 17, 18, 19), EOT, *w(20, 21, 22)]]
    # video: a 3-frame clip in one window, then one window per frame with its caption
    return [[BOS, *w(1), IMG, IMG, IMG, *w(2, 3, 4), IMG, *w(5, 6), EOT, IMG, *w(7), EOT, IMG, *w(8, 9), EOT,
             IMG, *w(10)]]


def make_case(kind: str, seed: int = 0) -> Dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(_rows(kind))  # [b, s]
    rows, positions = [], []
    for r, row in enumerate(ids.tolist()):
        for p, tok in enumerate(row):
            if tok == IMG:
                start = p
                while start > 0 and row[start - 1] == IMG:
                    start -= 1
                rows.append(r)
                positions.append(start)
    shapes = [(2, 2), (2, 4), (4, 2), (4, 4)]
    grid = torch.tensor([shapes[i % len(shapes)] for i in range(len(rows))])
    patches = torch.randn(int(grid.prod(1).sum()), 3 * 14 * 14, generator=g)
    return {"input_ids": ids, "pixel_patches": patches, "grid_hw": grid,
            "image_rows": torch.tensor(rows), "image_positions": torch.tensor(positions)}


def megatron_batch(case: Dict):
    from casa_megatron.model.batch import VLMBatch

    b, s = case["input_ids"].shape
    return VLMBatch(input_ids=case["input_ids"], position_ids=torch.arange(s).repeat(b, 1),
                    pixel_patches=case["pixel_patches"], image_grid_hw=case["grid_hw"],
                    image_rows=case["image_rows"], image_positions=case["image_positions"])


def hf_inputs(case: Dict) -> Dict:
    grid = case["grid_hw"]
    return {"input_ids": case["input_ids"], "pixel_values": case["pixel_patches"],
            "image_grid_thw": torch.cat([torch.ones(len(grid), 1, dtype=torch.long), grid], 1)}

"""Export small megatron models (TP=1, every fusion variant) to HF folders, in one forked process.

Returns the megatron logits of each variant on the image+text and video+text cases, so tests can
compare the HF model against them. Used by the ``exported`` fixtures of tests/hf and tests/inference.
"""

from __future__ import annotations

from typing import Iterable

import torch
from support.dist import run_distributed
from support.hf_cases import IMAGE_SLOTS, VARIANTS, make_case, megatron_batch


def _export(rank, world, root, variants):
    from pathlib import Path

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from support.hf_export import export_megatron, tiny_tokenizer
    from support.vlm import VOCAB, perturbed_full_state, small_model_config

    root = Path(root)
    tok = tiny_tokenizer(root / "tokenizer", VOCAB)
    initialize_parallel(1, 1, seed=0)
    logits = {}
    for name in variants:
        fusion = VARIANTS[name]
        cfg = small_model_config(**fusion)
        model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
        load_full_state(model, perturbed_full_state(model), 0, 1)
        model.eval()
        with torch.no_grad():
            logits[name] = {kind: model(megatron_batch(make_case(kind))).transpose(0, 1).contiguous()
                            for kind in ("image", "video")}
        export_megatron(model, cfg, root / name, tok, image_token_id=4)
    return logits


def export_variants(root, variants: Iterable[str] = tuple(VARIANTS)):
    """(root, {variant: {kind: logits}}) with one HF folder per variant under ``root``."""
    return root, run_distributed(_export, world_size=1, root=str(root), variants=list(variants))[0]

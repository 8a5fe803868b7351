"""One export of every fusion variant per test session (megatron is built in one forked process)."""

from __future__ import annotations

import pytest
import torch
from support.dist import run_distributed
from support.hf_cases import IMAGE_SLOTS, VARIANTS, make_case, megatron_batch


def _export_all(rank, world, root):
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
    for name, fusion in VARIANTS.items():
        cfg = small_model_config(**fusion)
        model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
        load_full_state(model, perturbed_full_state(model), 0, 1)
        model.eval()
        with torch.no_grad():
            logits[name] = {kind: model(megatron_batch(make_case(kind))).transpose(0, 1).contiguous()
                            for kind in ("image", "video")}
        export_megatron(model, cfg, root / name, tok, image_token_id=4)
    return logits


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    return root, run_distributed(_export_all, world_size=1, root=str(root))[0]



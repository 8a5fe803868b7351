"""The exported HF model (our remote code, loaded by transformers) equals the megatron model.

One forked process builds every fusion variant at TP=1 with perturbed weights (gates away from 0,
CASA weights away from their SA copies), exports it through the small test mapping and records
its logits on image+text and video+text inputs; this process then loads each folder with
``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` and compares (fp32, <= 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from support.dist import run_distributed
from support.hf_cases import IMAGE_SLOTS, VARIANTS, hf_inputs, make_case, megatron_batch

TOL = dict(rtol=1e-4, atol=1e-4)


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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    return root, run_distributed(_export_all, world_size=1, root=str(root))[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_equal_megatron(exported, variant):
    from transformers import AutoModelForCausalLM

    root, logits = exported
    model = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=True).eval()
    assert type(model).__name__ == "CasaForCausalLM"
    for kind in ("image", "video"):
        with torch.no_grad():
            out = model(**hf_inputs(make_case(kind)), use_cache=False).logits
        ref = torch.as_tensor(logits[variant][kind])
        torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"{variant} / {kind}: {m}")


def test_images_reach_the_text(exported):
    """Guard against a vacuous match: other pixels give other logits after the first image."""
    from transformers import AutoModelForCausalLM

    root, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "casa_parallel", trust_remote_code=True).eval()
    inputs = hf_inputs(make_case("image"))
    with torch.no_grad():
        a = model(**inputs, use_cache=False).logits
        b = model(**{**inputs, "pixel_values": inputs["pixel_values"] + 1.0}, use_cache=False).logits
    assert torch.equal(a[0, :3], b[0, :3])  # the leading text-only window never sees an image
    assert (a[0, 3:] - b[0, 3:]).abs().max() > 1e-3

"""The exported HF model (our remote code, loaded by transformers) equals the megatron model.

The session fixture ``exported`` (conftest) trains every fusion variant one step at TP=2 and at
PP=2, CASA and insertion also at PP=2 with the encoder over both stages (weights perturbed first so norms, CASA copies and gates are non-trivial), saves a training
checkpoint, exports it with ``casa-convert export-hf`` and records the megatron logits on
image+text and video+text inputs; here each folder is loaded with
``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` and compared (fp32, <= 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from support.hf_cases import hf_inputs, make_case
from support.hf_fixture import ALL_VARIANTS, LAYOUTS, layout_applies

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant, layout", [(v, l) for l in LAYOUTS for v in ALL_VARIANTS if layout_applies(l, v)])
def test_hf_logits_equal_megatron(exported, variant, layout):
    from transformers import AutoModelForCausalLM

    root, logits = exported
    model = AutoModelForCausalLM.from_pretrained(root / "hf" / layout / variant, trust_remote_code=True).eval()
    assert type(model).__name__ == "CasaForCausalLM"
    for kind in ("image", "video"):
        with torch.no_grad():
            out = model(**hf_inputs(make_case(kind)), use_cache=False).logits
        ref = torch.as_tensor(logits[layout][variant][kind])
        torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"{variant} ({layout}) / {kind}: {m}")


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

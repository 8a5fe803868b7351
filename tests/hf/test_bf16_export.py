"""The exported model in bf16 on CPU -- how it runs on a GPU (`from_pretrained(..., dtype=bf16)`):
the forward stays within bf16 tolerance of float32, the cache holds bf16, and cached generation
gives the logits a full bf16 recomputation of the same tokens gives."""

from __future__ import annotations

import pytest
import torch
from support.hf_cases import IMG, hf_inputs, make_case


def _load(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("variant", ["casa_parallel", "cross_attention_gated", "insertion", "casa_mrope"])
def test_bf16_forward_and_cached_generation(exported, variant):
    root = exported[0]
    if not (root / variant).exists():
        pytest.skip(f"{variant} not exported on this branch")
    fp32, bf16 = _load(root / variant, torch.float32), _load(root / variant, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    inputs = hf_inputs(make_case("video"))  # float32 pixels, as the processor gives them
    with torch.no_grad():
        ref = fp32(**inputs, use_cache=False).logits
        low = bf16(**inputs, use_cache=False).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert _rel(low, ref) < 3e-2, f"{variant}: bf16 logits rel. error {_rel(low, ref):.3g}"

    ids = inputs["input_ids"][:, :18]
    n_img = int((ids == IMG).sum())
    grid = inputs["image_grid_thw"][:n_img]
    prompt = {"input_ids": ids, "pixel_values": inputs["pixel_values"][:int(grid.prod(-1).sum())],
              "image_grid_thw": grid}
    out = bf16.generate(**prompt, max_new_tokens=6, do_sample=False, suppress_tokens=[IMG], use_cache=True,
                        return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    cache = out.past_key_values.rows[0]
    cached_tensors = [t for kv in cache.self_attn.values() for t in kv.view() if t is not None]
    for window in cache.windows.values():
        cached_tensors += [t for t in (window.image_k, window.image_v, *window.text.view()) if t is not None]
    assert cached_tensors and {t.dtype for t in cached_tensors} == {torch.bfloat16}
    with torch.no_grad():  # the same tokens recomputed in one pass, no cache
        full = bf16(input_ids=out.sequences, pixel_values=prompt["pixel_values"], image_grid_thw=grid,
                    use_cache=False).logits
    for step, logits in enumerate(out.logits):
        recomputed = full[:, ids.shape[1] - 1 + step].float()
        assert _rel(logits.float(), recomputed) < 2e-2, f"{variant} step {step}"

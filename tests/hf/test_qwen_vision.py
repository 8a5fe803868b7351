"""The ``qwen2_5_vl`` encoder of the remote code: transformers' own Qwen2.5-VL tower under the hub
names, so a Qwen2.5-VL checkpoint's ``visual.*`` tensors load as they are and give the same
image features as ``Qwen2_5_VLForConditionalGeneration``."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])


def test_qwen_visual_tensors_load_and_features_match(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from casa_megatron.hf.remote.configuration_casa import CasaConfig
    from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM
    from casa_megatron.hf.remote.processing_casa import image_patches

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}},
        vision_config={**VISION, "out_hidden_size": 32})).eval()
    qwen.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    visual = {k: v for k, v in on_disk.items() if k.startswith("visual.")}

    ours = CasaForCausalLM(CasaConfig(**text, attention_bias=True, vision_config={"encoder": "qwen2_5_vl", **VISION},
                                      image_token_id=4)).eval()
    ours_visual = {k for k in ours.state_dict() if k.startswith("visual.")}
    assert ours_visual == set(visual)  # the hub names, exactly
    missing, _ = ours.load_state_dict(visual, strict=False)
    assert not [k for k in missing if k.startswith("visual.")]

    rng = np.random.default_rng(0)
    pixels = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((56, 84), (112, 56))]
    patches = [image_patches(p, "qwen2_5_vl") for p in pixels]
    pixel_values = torch.cat([x for x, _ in patches])
    grid = torch.tensor([g for _, g in patches])
    with torch.no_grad():
        ref = torch.cat(qwen.model.get_image_features(pixel_values, grid).pooler_output)
        got = torch.cat(ours.image_embeddings(pixel_values, grid))
        assert got.shape == (6 + 8, 32)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[2, 7, 4, 8, 9, 4, 10]])
        logits = ours(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, use_cache=False).logits
    assert logits.shape == (1, 7, 128) and torch.isfinite(logits).all()
    # bf16, as on a GPU: float32 pixels go into a bf16 tower (the first real bf16 forward of the
    # megatron side crashed on exactly this); features stay within bf16 tolerance of float32
    ours_bf16 = ours.to(torch.bfloat16)
    with torch.no_grad():
        low = torch.cat(ours_bf16.image_embeddings(pixel_values, grid))
        low_logits = ours_bf16(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, use_cache=False).logits
    assert low.dtype == low_logits.dtype == torch.bfloat16
    rel = ((low.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < 3e-2, rel
    rel_logits = ((low_logits.double() - logits.double()).norm() / logits.double().norm()).item()
    assert rel_logits < 3e-2, rel_logits

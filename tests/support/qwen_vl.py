"""A tiny random transformers ``Qwen2_5_VLForConditionalGeneration`` (every weight randomised:
no zero bias, no unit norm), the oracle of the insertion baseline imported from it with
``casa-convert import-hf`` (tests/model/test_insertion_qwen.py)."""

from __future__ import annotations

import torch
from support.qwen_vision import hf_vision_config

IMAGE_ID, VIDEO_ID, VOCAB = 120, 121, 128


def hf_qwen_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 2, 2]}),
        vision_config=hf_vision_config().to_dict(), image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model

"""Tiny random Hugging Face models made by transformers inside the tests (no downloads), saved
as sharded safetensors, and text batches to compare our model's logits with theirs."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 99  # not a multiple of 2: the import pads it to 128 (TP-divisible), logits slice it off
LAYERS = 4


def _lm_kwargs(**extra):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1)  # a larger init than 0.02: differences must show in the logits
    kw.update(extra)
    return kw


def hf_config(family: str):
    """Small configs exercising each family's particulars."""
    from transformers import HeliumConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen2_5_VLConfig, Qwen3Config

    if family == "qwen2":  # GQA, QKV bias, tied embeddings
        return Qwen2Config(**_lm_kwargs(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1e6}))
    if family == "qwen3":  # per-head q/k norms, no QKV bias, head_dim != hidden / heads, tied embeddings
        return Qwen3Config(**_lm_kwargs(head_dim=24, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    if family == "helium":  # interleaved RoPE, norm eps 1e-8, head_dim set explicitly
        return HeliumConfig(**_lm_kwargs(head_dim=16, rms_norm_eps=1e-8, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2))
    if family == "llama":  # llama3 RoPE scaling, head_dim != hidden / heads
        return LlamaConfig(**_lm_kwargs(head_dim=24, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    if family == "mistral":  # Llama's layout; sliding_window null (Mistral-7B-v0.3), head_dim explicit
        return MistralConfig(**_lm_kwargs(head_dim=16, sliding_window=None, rms_norm_eps=1e-5,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    if family == "llama_linear":  # linear RoPE scaling (positions / factor)
        return LlamaConfig(**_lm_kwargs(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}))
    if family in ("qwen2_5_vl", "qwen2_5_vl_merger_32"):  # the latter: a merger to another LM width
        return Qwen2_5_VLConfig(
            text_config=_lm_kwargs(bos_token_id=1, eos_token_id=2, rope_parameters={
                "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
            vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64 if family == "qwen2_5_vl" else 32,
                               intermediate_size=48, num_heads=2, fullatt_block_indexes=[1]),
            tie_word_embeddings=True, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = hf_config(family)
    if family.startswith("qwen2_5_vl"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf_model(model, folder: Path, shard: str = "40KB") -> Path:
    """Sharded safetensors + index JSON (hub layout), like a downloaded folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), max_shard_size=shard)
    return folder


def text_batch(seed: int, b: int = 2, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g)


@torch.no_grad()
def hf_logits(model, input_ids) -> torch.Tensor:
    """[b, s, vocab] (fp32)."""
    if hasattr(model, "model") and hasattr(model.model, "language_model"):  # Qwen2.5-VL: text only
        position_ids = torch.arange(input_ids.shape[1]).expand(3, *input_ids.shape)
        return model(input_ids=input_ids, position_ids=position_ids).logits.float()
    return model(input_ids=input_ids).logits.float()

"""The remote code's LM equals transformers' own Qwen2 / Llama / Qwen3 / Mistral / Helium models
(their hub tensor names, GQA, QKV bias, tied embeddings, Llama-3 RoPE scaling, Qwen3's per-head
q/k norms, Helium's interleaved RoPE and norm eps).

Our model is loaded with the family checkpoint's tensors as they are (``strict``) and run with
``fusion_mechanism='insertion'`` and no image, i.e. as the plain backbone."""

from __future__ import annotations

import pytest
import torch

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "qwen2": dict(cls="Qwen2", extra=dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                  ours=dict(attention_bias=True)),
    "llama": dict(cls="Llama", extra=dict(tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=False,
                                          rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64}),
                  ours=dict(attention_bias=False)),
    "qwen3": dict(cls="Qwen3", extra=dict(tie_word_embeddings=True, rms_norm_eps=1e-6, attention_bias=False,
                                          head_dim=12, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                  ours=dict(attention_bias=False, qk_layernorm=True)),
    "mistral": dict(cls="Mistral", extra=dict(tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                    ours=dict(attention_bias=False)),
    "helium": dict(cls="Helium", extra=dict(tie_word_embeddings=False, rms_norm_eps=1e-8, attention_bias=False,
                                            head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 2e4}),
                   ours=dict(attention_bias=False)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backbone_equals_transformers(family, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from casa_megatron.hf.remote.configuration_casa import CasaConfig
    from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM

    spec = FAMILIES[family]
    torch.manual_seed(0)
    cfg_cls = getattr(transformers, f"{spec['cls']}Config")
    ref = getattr(transformers, f"{spec['cls']}ForCausalLM")(cfg_cls(**COMMON, **spec["extra"])).eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))  # the hub names, as on disk

    extra = {k: v for k, v in spec["extra"].items() if k != "attention_bias"}
    ours = CasaForCausalLM(CasaConfig(**COMMON, **extra, **spec["ours"], lm_family=family,
                                      fusion_mechanism="insertion", image_token_id=95)).eval()
    lm_state = {k: v for k, v in ours.state_dict().items() if not k.startswith("visual.")}
    expected = set(lm_state) - ({"lm_head.weight"} if spec["extra"]["tie_word_embeddings"] else set())
    assert set(tensors) == expected, set(tensors) ^ expected
    missing, unexpected = ours.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "lm_head.weight" for k in missing)
    if spec["extra"]["tie_word_embeddings"]:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, use_cache=False).logits, ref(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)

"""What an exported folder can be, and whether a model fits it.

Two formats:

* ``casa``: our own ``model_type: casa`` with the remote code of ``hf/remote`` (every fusion:
  CASA, cross-attention, token insertion with 1-D positions), ``config.json`` from
  ``hf/config_map.py``;
* ``qwen2_5_vl``: transformers' own ``Qwen2_5_VLForConditionalGeneration`` (no remote code):
  the token-insertion baseline whose backbone *is* Qwen2.5-VL (its encoder, multimodal RoPE,
  a Qwen2 LM). Insertion with ``mrope`` positions has no other HF equivalent (the remote code
  refuses it), so ``auto`` picks this format for it.

Each format lists every field of a model it cannot represent, so a refusal names all of them
at once instead of writing a folder that would load and compute something else.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from casa_megatron.config.schema import ModelConfig
from casa_megatron.conversion.errors import ConversionError

FORMATS = ("auto", "casa", "qwen2_5_vl")
QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Checkpoint name -> module path, per format (the first matching prefix is renamed). A PEFT
# adapter addresses modules, and transformers 5 saves Qwen2_5_VLForConditionalGeneration under
# its pre-5 checkpoint names (``model.layers.*``, ``visual.*``), renamed on load by its conversion
# mapping to the modules ``model.language_model.layers.*`` / ``model.visual.*``. The casa remote
# code's modules carry their checkpoint names.
MODULE_PREFIXES = {"casa": (), "qwen2_5_vl": (("visual.", "model.visual."), ("model.", "model.language_model."))}


def is_native_qwen(model: ModelConfig) -> bool:
    """Token insertion with Qwen2.5-VL's encoder and multimodal positions."""
    return (model.fusion.mechanism == "insertion" and model.vision.encoder == "qwen2_5_vl"
            and model.fusion.resolved_image_position_scheme(model.vision.encoder) == "mrope")


def module_path(fmt: str, name: str) -> str:
    """The module that holds checkpoint tensor ``name`` (its ``.weight`` cut) in format ``fmt``."""
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    for old, new in MODULE_PREFIXES[fmt]:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def choose_format(model: ModelConfig, requested: str = "auto") -> str:
    """The format to write; ConversionError listing every reason when the model does not fit."""
    if requested not in FORMATS:
        raise ConversionError(f"--format {requested!r} not in {FORMATS}")
    fmt = requested if requested != "auto" else ("qwen2_5_vl" if is_native_qwen(model) else "casa")
    problems = qwen_problems(model) if fmt == "qwen2_5_vl" else casa_problems(model)
    if problems:
        target = ("transformers' Qwen2_5_VLForConditionalGeneration" if fmt == "qwen2_5_vl"
                  else "the CASA remote code (model_type 'casa')")
        raise ConversionError(f"this model has no equivalent in {target}:\n  " + "\n  ".join(problems))
    return fmt


def _projector_problems(model: ModelConfig) -> List[str]:
    v = model.vision
    fixed = v.hidden_size * v.spatial_merge_size ** 2 if v.encoder == "qwen2_5_vl" else model.lm.hidden_size
    if v.projector_hidden_size not in (None, fixed):
        return [f"model.vision.projector_hidden_size={v.projector_hidden_size}: the HF merger's hidden width is "
                f"fixed ({fixed} here: vision width x merge^2 for qwen2_5_vl, the LM width for tiny_vit)"]
    return []


def casa_problems(model: ModelConfig) -> List[str]:
    problems = _projector_problems(model)
    if model.vision.encoder == "qwen2_5_vl" and not float(model.vision.tokens_per_second).is_integer():
        problems.append(f"model.vision.tokens_per_second={model.vision.tokens_per_second}: transformers' "
                        "Qwen2.5-VL vision config takes an integer")
    if is_native_qwen(model):
        problems.append("model.fusion.mechanism='insertion' with image_position_scheme 'mrope' is Qwen2.5-VL "
                        "itself: export it with --format qwen2_5_vl (or auto)")
    return problems


def qwen_problems(model: ModelConfig) -> List[str]:
    lm, v, fusion = model.lm, model.vision, model.fusion
    problems = []
    if fusion.mechanism != "insertion":
        problems.append(f"model.fusion.mechanism={fusion.mechanism!r}: Qwen2_5_VLForConditionalGeneration only "
                        "inserts image tokens into the text stream (use --format casa)")
    if v.encoder != "qwen2_5_vl":
        problems.append(f"model.vision.encoder={v.encoder!r}: Qwen2.5-VL's vision tower is 'qwen2_5_vl'")
    scheme = fusion.resolved_image_position_scheme(v.encoder)
    if scheme != "mrope":
        problems.append(f"model.fusion.image_position_scheme={scheme!r}: Qwen2.5-VL positions images with 'mrope'")
    if lm.family in ("helium", "llama", "mistral", "qwen3"):
        problems.append(f"model.lm.family={lm.family!r}: Qwen2.5-VL's LM is a Qwen2 decoder")
    if lm.qk_layernorm:
        problems.append("model.lm.qk_layernorm=true: Qwen2.5-VL's attention has no q/k norms")
    if not lm.add_qkv_bias:
        problems.append("model.lm.add_qkv_bias=false: Qwen2.5-VL's q/k/v projections have biases")
    if lm.kv_channels not in (None, lm.hidden_size // lm.num_attention_heads):
        problems.append(f"model.lm.kv_channels={lm.kv_channels}: Qwen2.5-VL's head size is hidden_size / heads")
    if lm.rope_scaling.type != "none":
        problems.append(f"model.lm.rope_scaling.type={lm.rope_scaling.type!r}: Qwen2.5-VL uses unscaled M-RoPE")
    if not float(v.tokens_per_second).is_integer():
        problems.append(f"model.vision.tokens_per_second={v.tokens_per_second}: transformers takes an integer")
    if v.norm_epsilon != 1e-6:
        problems.append(f"model.vision.norm_epsilon={v.norm_epsilon}: Qwen2.5-VL's vision norms use 1e-6")
    return problems + _projector_problems(model)


def qwen2_5_vl_config(model: ModelConfig, token_ids: Dict[str, int], dtype: str,
                      text_tokens: Optional[Dict[str, Optional[int]]] = None) -> dict:
    """transformers' ``Qwen2_5_VLConfig`` for this model, as the ``config.json`` dict
    (``text_tokens``: the tokenizer's bos / eos / pad ids for the text config)."""
    from transformers import Qwen2_5_VLConfig

    lm, v = model.lm, model.vision
    text = dict(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
                num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
                num_key_value_heads=lm.num_query_groups, rms_norm_eps=lm.norm_epsilon,
                max_position_embeddings=lm.max_position_embeddings, initializer_range=lm.init_method_std,
                rope_parameters={"rope_type": "default", "rope_theta": float(lm.rotary_base),
                                 "mrope_section": list(lm.resolved_mrope_section)}, **(text_tokens or {}))
    full = v.fullatt_block_indexes
    vision = dict(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                  num_heads=v.num_attention_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  tokens_per_second=int(v.tokens_per_second), window_size=v.window_size, out_hidden_size=lm.hidden_size,
                  fullatt_block_indexes=list(range(v.num_layers)) if full is None else list(full),
                  rope_parameters={"rope_type": "axial", "rope_theta": float(v.rope_theta)})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=lm.tie_word_embeddings,
                              **token_ids)
    out = config.to_dict()
    out.update(architectures=["Qwen2_5_VLForConditionalGeneration"], dtype=dtype)
    out["text_config"]["dtype"] = dtype
    return out

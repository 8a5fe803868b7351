"""Configuration of an exported CASA vision-language model (``model_type: casa``).

This file is transformers remote code: it is copied into every exported folder and loaded with
``trust_remote_code=True`` in processes that have never heard of ``casa_megatron``, so it may
import torch / transformers only. One flat config describes the three parts:

* the LM backbone in its family's Hugging Face vocabulary (``lm_family``: ``generic``, ``qwen2``,
  ``qwen2_5_vl``, ``qwen3``, ``llama``, ``mistral`` (Llama's layout) or ``helium``; Helium rotates interleaved pairs, the others
  halves; ``qk_layernorm``: Qwen3's per-head query / key norms);
* the fusion (``fusion_mechanism``: ``casa`` / ``cross_attention`` / ``insertion``;
  ``fusion_placement``: ``parallel`` / ``before`` / ``replace``; ``fusion_layers``: global LM
  indices holding a fusion module; ``share_projections``; ``cross_attention_gate``;
  ``image_position_scheme``: ``insertion`` / ``none`` / ``mrope`` (the multimodal scheme lives
  with the Qwen2.5-VL encoder; see ``modeling_casa.image_key_rotary``));
* the vision encoder (``vision_config``: a dict; ``encoder`` is ``tiny_vit`` or ``qwen2_5_vl``,
  the latter being transformers' own Qwen2.5-VL vision tower config; ``tokens_per_second``: the
  ``mrope`` temporal step of video clips per second);
* the text layout it was trained with: ``image_token_id`` (and ``video_token_id``) mark images in
  ``input_ids``; ``placeholders_in_stream`` True for our layout tokens (``<image>`` is a text
  token, the image sits before it), False for a chat template (``<|image_pad|>`` is removed, the
  image sits before the next token), see ``modeling_casa``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from transformers import PretrainedConfig

LM_FAMILIES = ("generic", "qwen2", "qwen2_5_vl", "qwen3", "llama", "mistral", "helium")  # casa_megatron model.lm.family
MECHANISMS = ("casa", "cross_attention", "insertion")
PLACEMENTS = ("parallel", "before", "replace")
IMAGE_POSITION_SCHEMES = ("insertion", "none", "mrope")
ENCODERS = ("tiny_vit", "qwen2_5_vl")

TINY_VIT_DEFAULTS = dict(encoder="tiny_vit", depth=2, hidden_size=48, num_heads=4, intermediate_size=96,
                         patch_size=14, in_channels=3, spatial_merge_size=2, temporal_patch_size=1,
                         rms_norm_eps=1e-6, out_hidden_size=None)


class CasaConfig(PretrainedConfig):
    model_type = "casa"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 64,
        intermediate_size: int = 176,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: Optional[int] = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_parameters: Optional[Dict[str, Any]] = None,
        attention_bias: bool = False,
        qk_layernorm: bool = False,
        lm_family: str = "qwen2",
        fusion_mechanism: str = "casa",
        fusion_placement: str = "parallel",
        fusion_layers: Optional[List[int]] = None,
        share_projections: bool = False,
        cross_attention_gate: bool = False,
        image_position_scheme: str = "insertion",
        mrope_section: Optional[List[int]] = None,
        normalize_images: bool = True,
        vision_config: Optional[Dict[str, Any]] = None,
        image_token_id: int = 4,
        video_token_id: Optional[int] = None,
        placeholders_in_stream: bool = True,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.attention_bias = attention_bias
        self.qk_layernorm = qk_layernorm  # Qwen3: RMSNorm per query / key head (q_norm / k_norm)
        self.lm_family = lm_family
        self.fusion_mechanism = fusion_mechanism
        self.fusion_placement = fusion_placement
        self.fusion_layers = [] if fusion_mechanism == "insertion" else sorted(
            set(fusion_layers if fusion_layers is not None else range(num_hidden_layers)))
        self.share_projections = share_projections
        self.cross_attention_gate = cross_attention_gate
        self.image_position_scheme = image_position_scheme
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        self.normalize_images = normalize_images
        vision = dict(vision_config or {})
        if vision.get("encoder", "tiny_vit") == "tiny_vit":  # qwen2_5_vl: transformers' own defaults
            vision = {**TINY_VIT_DEFAULTS, **vision}
        self.vision_config = vision
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.placeholders_in_stream = placeholders_in_stream
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_casa()

    @property
    def resolved_mrope_section(self) -> List[int]:
        """(t, h, w) split of the head_dim/2 rotary frequencies; default Qwen2.5-VL's proportions
        1/4, 3/8, 3/8 rounded as casa_megatron does (``LanguageModelConfig.resolved_mrope_section``)."""
        if self.mrope_section is not None:
            return list(self.mrope_section)
        half = self.head_dim // 2
        hw = (3 * half) // 8
        return [half - 2 * hw, hw, hw]

    @property
    def rope_interleaved(self) -> bool:
        """Helium rotates adjacent pairs (x0, x1), (x2, x3)...; Qwen2 / Llama rotate halves."""
        return self.lm_family == "helium"

    def validate_casa(self) -> None:
        checks = (("lm_family", self.lm_family, LM_FAMILIES), ("fusion_mechanism", self.fusion_mechanism, MECHANISMS),
                  ("fusion_placement", self.fusion_placement, PLACEMENTS),
                  ("image_position_scheme", self.image_position_scheme, IMAGE_POSITION_SCHEMES),
                  ("vision_config.encoder", self.vision_config.get("encoder"), ENCODERS))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"CasaConfig.{name}={value!r} not in {allowed}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"CasaConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        bad = [i for i in self.fusion_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"CasaConfig.fusion_layers {bad} outside [0, {self.num_hidden_layers})")
        if self.share_projections and self.fusion_placement == "replace":
            raise ValueError("CasaConfig.share_projections needs a self-attention: not with fusion_placement='replace'")
        if sum(self.resolved_mrope_section) != self.head_dim // 2 or len(self.resolved_mrope_section) != 3:
            raise ValueError(f"CasaConfig.mrope_section={self.mrope_section} must be 3 numbers summing to "
                             f"head_dim / 2 = {self.head_dim // 2}")
        if self.image_position_scheme == "mrope" and self.fusion_mechanism == "insertion":
            raise ValueError("image_position_scheme='mrope' with insertion is Qwen2.5-VL itself: export it as "
                             "transformers' Qwen2_5_VLForConditionalGeneration, not as model_type 'casa'")
        if self.cross_attention_gate and self.fusion_mechanism != "cross_attention":
            raise ValueError("CasaConfig.cross_attention_gate needs fusion_mechanism='cross_attention'")


__all__ = ["CasaConfig"]

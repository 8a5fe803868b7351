"""Dataclass schema of the model: language model, vision encoder, fusion, recomputation.

Defaults describe a tiny CPU model; YAML files in ``configs/`` and ``key=value`` overrides move
it to real scales. ``validate`` methods fail before any work with a message naming the fields.
The run-level configs (parallel layout, optimizer, checkpoints, precision, tracking, profiling,
the whole ``TrainConfig``) are in ``schema.py``, which re-exports these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from casa_megatron.config.errors import ConfigError

FUSION_MECHANISMS = ("casa", "cross_attention", "insertion")
PLACEMENTS = ("parallel", "before", "replace")
IMAGE_POSITION_SCHEMES = ("auto", "insertion", "mrope", "none")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "torch", "flash", "te", "torch_varlen")
RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp")  # selective: megatron's names for what is recomputed


ROPE_SCALING_TYPES = ("none", "linear", "llama3")
LM_FAMILIES = ("generic", "qwen2", "qwen2_5_vl", "qwen3", "helium", "llama", "mistral")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling read from a Hugging Face config (``rope_parameters``).

    ``linear`` divides positions by ``factor``; ``llama3`` is Llama 3.1's smooth per-frequency
    scaling (megatron-core's implementation, with all four of its parameters passed through).
    """

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"model.lm.rope_scaling.type={self.type!r} not in {ROPE_SCALING_TYPES}")
        if self.type != "none" and self.factor <= 0:
            raise ConfigError(f"model.lm.rope_scaling.factor={self.factor} must be > 0")


@dataclass
class LanguageModelConfig:
    """GPT-style decoder: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias (Qwen2 / Helium family).

    ``family`` names the Hugging Face model family the weights follow (set by the importer;
    ``generic`` = our own models): it picks the conversion table, e.g. Helium's interleaved RoPE
    is stored permuted to megatron's rotate-half layout and permuted back on export.
    ``make_vocab_size_divisible_by``: the embedding and output layer hold ``padded_vocab_size``
    rows so every TP size divides them (independent of TP, so a checkpoint loads at any TP);
    the padded logits are masked out of the loss and sliced off for export.
    ``mrope_section``: Qwen2.5-VL's multimodal RoPE split of the rotary half-dimension, kept
    from the HF config for the insertion baseline's multimodal positions.
    ``qk_layernorm``: an RMSNorm over each query and key head before RoPE (Qwen3; megatron's
    ``qk_layernorm``); CASA / cross-attention layers then normalise their text queries and their
    text and image keys the same way, with norms of their own initialised from the layer's
    self-attention (or its own, with shared projections).
    """

    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 1
    tie_word_embeddings: bool = False
    family: str = "generic"
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 176
    kv_channels: Optional[int] = None
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    max_position_embeddings: int = 4096
    init_method_std: float = 0.02
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    mrope_section: Optional[List[int]] = None  # rotary frequency pairs per (t, h, w); None: default split

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def resolved_mrope_section(self) -> List[int]:
        """Multimodal-RoPE split of the head_dim/2 frequencies into (temporal, height, width).

        Default: Qwen2.5-VL's proportions 1/4, 3/8, 3/8 ([16, 24, 24] of 64 at head_dim 128),
        rounded so any head_dim works; the lowest-index (fastest) frequencies go to time.
        """
        if self.mrope_section is not None:
            return list(self.mrope_section)
        half = self.head_dim // 2
        hw = (3 * half) // 8
        return [half - 2 * hw, hw, hw]

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        self.rope_scaling.validate()
        if self.family not in LM_FAMILIES:
            raise ConfigError(f"model.lm.family={self.family!r} not in {LM_FAMILIES}")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError(f"model.lm.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} "
                              "must be >= 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.lm.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.lm.num_query_groups={self.num_query_groups}"
            )
        if self.mrope_section is not None and (len(self.mrope_section) != 3 or
                                               sum(self.mrope_section) != self.head_dim // 2):
            raise ConfigError(f"model.lm.mrope_section={self.mrope_section} must be 3 numbers (t, h, w) "
                              f"summing to head_dim / 2 = {self.head_dim // 2}")
        if self.qk_layernorm and self.family == "helium":
            raise ConfigError("model.lm.qk_layernorm=true with family 'helium': Helium's interleaved RoPE layout "
                              "would need the norm weights permuted too, and no Helium model has them")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.lm.hidden_size={self.hidden_size} is not divisible by "
                f"model.lm.num_attention_heads={self.num_attention_heads}; set model.lm.kv_channels"
            )


VISION_ENCODERS = ("tiny_vit", "qwen2_5_vl")


@dataclass
class RecomputeConfig:
    """Activation recomputation of LM decoder layers (Megatron-LM's ``--recompute-granularity full
    --recompute-method uniform|block --recompute-num-layers N``); ``model.vision.recompute`` does the
    same for the vision encoder's blocks. A recomputed chunk of layers keeps
    only its input ``[s(/tp), b, h]`` (and the image states it reads) from the forward; everything
    inside is computed again in backward -- about one extra forward of those layers for most of
    their activation memory, the lever when long packed rows (token insertion's 20k image tokens)
    do not fit. ``uniform``: the stage's layers in chunks of ``num_layers``, every chunk recomputed;
    ``block``: the first ``num_layers`` layers of each pipeline stage, one per chunk, the rest kept.
    Numerics are unchanged (same kernels, the RNG states replayed).

    ``selective`` (Megatron-LM's ``--recompute-granularity selective --recompute-modules``): only
    the ``modules`` of every layer are recomputed, each keeping its inputs instead of what it
    makes inside: ``core_attn`` the attention kernels (self-attention, CASA's and cross-attention's
    windows, the encoder's), whose scores are quadratic in the row on the padded torch path;
    ``mlp`` the feed-forward block, whose SwiGLU intermediate is ``2 x ffn_hidden_size`` per token.
    Cheaper than ``full`` (no projection or norm runs twice), it keeps more."""

    granularity: str = "none"  # none | full | selective
    method: str = "uniform"  # full: uniform | block
    num_layers: int = 1  # full: layers per chunk (uniform) or recomputed layers (block)
    modules: List[str] = field(default_factory=lambda: ["core_attn"])  # selective: megatron's default

    def validate(self, where: str = "model.recompute") -> None:
        if self.granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"{where}.granularity={self.granularity!r} not in {RECOMPUTE_GRANULARITIES}")
        if self.method not in RECOMPUTE_METHODS:
            raise ConfigError(f"{where}.method={self.method!r} not in {RECOMPUTE_METHODS}")
        unknown = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        if unknown or (self.selective and not self.modules):
            raise ConfigError(f"{where}.modules={list(self.modules)}: selective recomputation takes one or more of "
                              f"{RECOMPUTE_MODULES}")

    @property
    def enabled(self) -> bool:
        return self.granularity != "none"

    @property
    def full(self) -> bool:
        return self.granularity == "full"

    @property
    def selective(self) -> bool:
        return self.granularity == "selective"


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor of ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (PEFT's
    ``lora_alpha`` / ``r`` / ``use_rslora`` give the same; the PEFT import merges with it)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass
class LoRAConfig:
    """Low-rank adapters on frozen weights (LoRA, Hu et al. 2021; Megatron-Bridge's ``LoRA`` /
    PEFT's ``LoraConfig``), as ``model.lora`` (the language model) and ``model.vision.lora`` (the
    vision encoder's blocks): each targeted linear ``W`` of an adapted layer computes
    ``W x + (alpha / rank) * B(A(dropout(x)))``, ``A`` [rank, in] random, ``B`` [out, rank] zero,
    so training starts from the backbone's function. ``rank=0`` (default): no adapters.

    ``targets``: among ``linear_qkv`` / ``linear_proj`` (self-attention) and ``linear_fc1`` /
    ``linear_fc2`` (MLP) of every layer, or of ``layers`` (0-based LM layer / encoder block
    indices; None = all). LM adapters need ``model.freeze_lm=true`` and cannot target the
    self-attention projections that CASA shares (``fusion.share_projections``); encoder adapters
    need their blocks frozen (outside ``model.vision.trainable_blocks``). CASA weights are new and
    train in full beside them. ``export-hf`` merges them into the weights (``W + (alpha / rank) B A``).

    ``rslora``: scale by ``alpha / sqrt(rank)`` instead (rank-stabilized LoRA, Kalajdzievski 2023;
    PEFT's ``use_rslora``), so the update's size no longer shrinks as the rank grows.
    ``dora``: weight-decomposed LoRA (Liu et al. 2024; PEFT's ``use_dora``): a learned magnitude
    per output row rescales the adapted weight, ``m / ||W + s B A|| * (W + s B A)``; one more
    GEMM (``B A``) per adapted linear and forward. Not with ``dropout`` (PEFT's DoRA then
    recomputes the base on the dropped input, which a frozen megatron linear does not)."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    layers: Optional[List[int]] = None
    rslora: bool = False
    dora: bool = False

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    def adapted_layers(self, num_layers: int) -> List[int]:
        return sorted(set(self.layers)) if self.layers is not None else list(range(num_layers))

    def adapts(self, target: str, layer: int) -> bool:
        """Whether linear ``target`` of layer (or block) ``layer`` (global index) gets an adapter."""
        return self.enabled and target in self.targets and (self.layers is None or layer in self.layers)

    def validate(self, num_layers: int, where: str = "model.lora", counted: str = "model.lm.num_layers") -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}.rank={self.rank} must be >= 0 (0: no adapters)")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout} must be in [0, 1)")
        if self.dora and self.dropout:
            raise ConfigError(f"{where}.dora=true with {where}.dropout={self.dropout}: DoRA here takes no dropout "
                              "(PEFT's DoRA would recompute the frozen base on the dropped input); set one of them off")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"{where}.targets={self.targets}: choose one or more of {list(LORA_TARGETS)}")
        bad = [i for i in (self.layers or []) if not 0 <= i < num_layers]
        if bad or self.layers == []:
            raise ConfigError(f"{where}.layers={self.layers}: give indices in "
                              f"[0, {counted}={num_layers}), or leave it unset for all of them")

    def check_recompute(self, recompute: "RecomputeConfig", where: str, recompute_where: str) -> None:
        if self.enabled and self.dropout and recompute.enabled:
            raise ConfigError(f"{where}.dropout={self.dropout} with {recompute_where}.granularity="
                              f"{recompute.granularity}: the recomputed forward would draw other dropout "
                              "masks (megatron's model-parallel RNG is not replayed); set one of them off")


@dataclass
class VisionConfig:
    """Vision encoder: ViT over 14 px patches, then a 2x2 spatial merge in the projector.

    ``encoder``: ``tiny_vit`` (small, from scratch, for tests and CPU runs) or ``qwen2_5_vl``
    (the Qwen2.5-VL ViT: conv3d patch embedding over ``temporal_patch_size`` frames, 2D RoPE,
    window attention over ``window_size`` px windows with full attention in
    ``fullatt_block_indexes``; HF weights map onto it, see conversion/tables/vision.py). Field
    names follow megatron (``num_layers``); ``conversion/hf_configs/vision.py`` fills them from
    an HF ``vision_config`` (``depth``, ``num_heads``, ``intermediate_size``...).

    ``trainable_blocks``: -1 trains every block, 0 freezes the encoder, k > 0 trains the last k
    blocks (the paper trains the last 4 for images and freezes the encoder for video).
    ``ffn_pad_multiple``: the MLP width is padded with zero units to a multiple of this, so that
    widths like Qwen2.5-VL's 3420 split over TP=8; the padding is exact (its gate, up and down
    weights are zero and get zero gradients) and depends on the config only, never on TP, so
    checkpoints reshard across TP layouts (docs/architecture.md, "Vision encoders").
    ``recompute``: activation recomputation of the encoder's blocks (``RecomputeConfig``).
    ``lora``: LoRA adapters on frozen encoder blocks (``LoRAConfig``; ``layers`` are block indices).
    """

    encoder: str = "tiny_vit"
    num_layers: int = 2
    hidden_size: int = 48
    num_attention_heads: int = 4
    ffn_hidden_size: int = 96
    patch_size: int = 14
    in_channels: int = 3
    spatial_merge_size: int = 2
    norm_epsilon: float = 1e-6
    temporal_patch_size: int = 1  # frames per patch; qwen2_5_vl: 2 (a still image is repeated)
    window_size: int = 112  # qwen2_5_vl: window-attention side in px
    fullatt_block_indexes: Optional[List[int]] = None  # qwen2_5_vl: full-attention blocks; None = all
    rope_theta: float = 10000.0  # qwen2_5_vl: 2D RoPE base
    tokens_per_second: float = 2.0  # qwen2_5_vl: temporal mrope step per second of video
    projector_hidden_size: Optional[int] = None  # None: LM width (tiny_vit), hidden*merge^2 (qwen2_5_vl)
    ffn_pad_multiple: int = 1
    trainable_blocks: int = -1
    projector_trainable: bool = True
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)  # of the encoder's blocks
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters on frozen encoder blocks

    @property
    def padded_ffn_hidden_size(self) -> int:
        m = self.ffn_pad_multiple
        return -(-self.ffn_hidden_size // m) * m

    @property
    def patch_dim(self) -> int:
        """Width of one pixel patch row: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def trained_blocks(self) -> range:
        """Global indices of the blocks that train in full (``trainable_blocks``: all, none or the last k)."""
        k = self.trainable_blocks
        return range(self.num_layers) if k == -1 else range(self.num_layers - k, self.num_layers)

    def projector_width(self, lm_hidden: int) -> int:
        if self.projector_hidden_size is not None:
            return self.projector_hidden_size
        if self.encoder == "qwen2_5_vl":
            return self.hidden_size * self.spatial_merge_size ** 2
        return lm_hidden

    def validate(self) -> None:
        if self.encoder not in VISION_ENCODERS:
            raise ConfigError(f"model.vision.encoder={self.encoder!r} not in {VISION_ENCODERS}")
        self.recompute.validate("model.vision.recompute")
        self.lora.validate(self.num_layers, "model.vision.lora", "model.vision.num_layers")
        self.lora.check_recompute(self.recompute, "model.vision.lora", "model.vision.recompute")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.vision.hidden_size={self.hidden_size} is not divisible by "
                f"model.vision.num_attention_heads={self.num_attention_heads}"
            )
        if self.trainable_blocks < -1 or self.trainable_blocks > self.num_layers:
            raise ConfigError(
                f"model.vision.trainable_blocks={self.trainable_blocks} must be -1 (all), 0 (frozen) "
                f"or at most model.vision.num_layers={self.num_layers}"
            )
        both = [i for i in self.trained_blocks() if any(self.lora.adapts(t, i) for t in self.lora.targets)]
        if both:
            raise ConfigError(f"model.vision.lora adapts blocks {both}, which model.vision.trainable_blocks="
                              f"{self.trainable_blocks} trains in full; adapters adapt frozen blocks "
                              "(e.g. trainable_blocks=0)")
        if self.encoder == "tiny_vit" and self.temporal_patch_size != 1:
            raise ConfigError(f"model.vision.temporal_patch_size={self.temporal_patch_size}: tiny_vit "
                              "embeds single frames (1)")
        if self.temporal_patch_size < 1 or self.ffn_pad_multiple < 1:
            raise ConfigError(f"model.vision.temporal_patch_size={self.temporal_patch_size} and "
                              f"model.vision.ffn_pad_multiple={self.ffn_pad_multiple} must be >= 1")
        if self.encoder == "qwen2_5_vl":
            head_dim = self.hidden_size // self.num_attention_heads
            if head_dim % 4:
                raise ConfigError(f"model.vision head dim {head_dim} (hidden_size / num_attention_heads) "
                                  "must be a multiple of 4 for the 2D RoPE (height and width halves)")
            unit = self.patch_size * self.spatial_merge_size
            if self.window_size % unit:
                raise ConfigError(f"model.vision.window_size={self.window_size} must be a multiple of "
                                  f"patch_size * spatial_merge_size = {unit}")
        bad = [i for i in (self.fullatt_block_indexes or []) if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"model.vision.fullatt_block_indexes has {bad} outside "
                              f"[0, model.vision.num_layers={self.num_layers})")


@dataclass
class FusionConfig:
    """How vision enters the LM.

    ``mechanism``: ``casa`` (text queries attend to [window images ++ window text <= t]),
    ``cross_attention`` (same module with text keys off) or ``insertion`` (the baseline: image
    tokens inserted into the text stream; no fusion layers). ``placement``: ``parallel`` (default,
    ``x + SA(N1 x) + CASA(N2 x)``), ``before`` (``x + CASA(N x)`` then the usual block) or
    ``replace`` (CASA instead of self-attention). ``share_projections``: CASA reuses the layer's
    self-attention Q/K/V/O (no new parameters; parallel/before only). Layers are chosen by
    ``layers`` (0-based LM indices) or ``every_n`` (layers n-1, 2n-1, ...); neither means all.
    ``image_position_scheme``: RoPE positions of image tokens. CASA / cross-attention image keys:
    ``insertion`` rotates every image key by the text position of its window start, so the
    query-key phase depends only on the distance from the window start, like text; ``mrope``
    gives each image key its Qwen2.5-VL multimodal position (temporal, height, width) added to
    that window start, so frame order and spatial layout are visible; ``none`` leaves image keys
    unrotated. Token insertion: ``insertion`` counts image tokens as consecutive positions
    (LLaVA), ``mrope`` builds Qwen2.5-VL's 3D positions (transformers' ``get_rope_index``).
    ``auto`` (default) is ``mrope`` with the ``qwen2_5_vl`` encoder, ``insertion`` otherwise.
    Text always keeps 1-D positions; the (t, h, w) split of the rotary frequencies is
    ``model.lm.mrope_section``.
    ``normalize_images``: image tokens go through the CASA layer's pre-attention norm, like the
    text (default; ``false`` feeds the raw projector output, an ablation: see docs/benchmarks.md).
    ``image_kv_only``: image tokens are projected to keys/values only (the K/V rows of the fused
    QKV weight; same result, no wasted query GEMM); ``false`` runs the whole fused QKV on them and
    drops the queries (the old path, kept as the reference).
    """

    mechanism: str = "casa"
    placement: str = "parallel"
    cross_attention_gate: bool = False  # Flamingo/mllama tanh gate (init 0), cross_attention only
    share_projections: bool = False
    layers: Optional[List[int]] = None
    every_n: Optional[int] = None
    image_position_scheme: str = "auto"
    normalize_images: bool = True
    image_kv_only: bool = True
    init_from_self_attention: bool = True

    def fusion_layers(self, num_layers: int) -> List[int]:
        """0-based LM layer indices that hold a CASA module (none for insertion)."""
        if self.mechanism == "insertion":
            return []
        if self.layers is not None:
            return sorted(set(self.layers))
        n = self.every_n or 1
        return [i for i in range(num_layers) if (i + 1) % n == 0]

    def resolved_image_position_scheme(self, encoder: str) -> str:
        """``auto`` -> ``mrope`` for the Qwen2.5-VL encoder (its native positions), else ``insertion``."""
        if self.image_position_scheme != "auto":
            return self.image_position_scheme
        return "mrope" if encoder == "qwen2_5_vl" else "insertion"

    def validate(self, num_layers: int) -> None:
        if self.mechanism not in FUSION_MECHANISMS:
            raise ConfigError(f"model.fusion.mechanism={self.mechanism!r} not in {FUSION_MECHANISMS}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"model.fusion.placement={self.placement!r} not in {PLACEMENTS}")
        if self.image_position_scheme not in IMAGE_POSITION_SCHEMES:
            raise ConfigError(
                f"model.fusion.image_position_scheme={self.image_position_scheme!r} "
                f"not in {IMAGE_POSITION_SCHEMES}"
            )
        if self.mechanism == "insertion" and self.image_position_scheme == "none":
            raise ConfigError("model.fusion.image_position_scheme='none' has no meaning for "
                              "mechanism='insertion' (image tokens sit in the text stream)")
        if self.layers is not None and self.every_n is not None:
            raise ConfigError("model.fusion.layers and model.fusion.every_n are both set; choose one")
        if self.every_n is not None and self.every_n < 1:
            raise ConfigError(f"model.fusion.every_n={self.every_n} must be >= 1")
        bad = [i for i in (self.layers or []) if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"model.fusion.layers has indices {bad} outside [0, model.lm.num_layers={num_layers})"
            )
        if self.share_projections and self.placement == "replace":
            raise ConfigError(
                "model.fusion.share_projections=true with model.fusion.placement='replace': a "
                "replaced layer has no self-attention to share"
            )
        if self.mechanism != "insertion" and not self.fusion_layers(num_layers):
            raise ConfigError("model.fusion selects no LM layer; check layers / every_n")
        if self.cross_attention_gate and self.mechanism != "cross_attention":
            raise ConfigError(f"model.fusion.cross_attention_gate=true needs mechanism='cross_attention', "
                              f"not {self.mechanism!r}")


@dataclass
class ModelConfig:
    """``attention_backend``: the window-attention kernel of CASA and of packed self-attention
    (``auto``: flash-attn, then TE, then torch varlen on CUDA half tensors, else padded torch).
    ``packed_attention``: LM self-attention over packed samples by cu_seqlens, without the dense
    ``[b, 1, s, s]`` block-causal mask; ``false`` keeps the dense-mask path (the reference).
    ``recompute``: activation recomputation of decoder layers (``RecomputeConfig``).
    ``trainable_tokens``: token ids whose embedding (and untied output) rows train while the LM is
    frozen, every other row staying as it was (``model/token_rows.py``): tokens added at import
    (``import-hf --add-tokens`` lists their ids) that the model must learn to produce."""

    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    freeze_lm: bool = False
    trainable_tokens: List[int] = field(default_factory=list)
    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    packed_attention: bool = True
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        self.lm.validate()
        self.vision.validate()
        self.fusion.validate(self.lm.num_layers)
        self.lora.validate(self.lm.num_layers)
        if self.lora.enabled and not self.freeze_lm:
            raise ConfigError(f"model.lora.rank={self.lora.rank} adapts a frozen language model: set "
                              "model.freeze_lm=true (or model.lora.rank=0 to train the LM in full)")
        self.lora.check_recompute(self.recompute, "model.lora", "model.recompute")
        if self.trainable_tokens:
            if not self.freeze_lm:
                raise ConfigError(f"model.trainable_tokens={self.trainable_tokens} trains rows of a frozen LM's "
                                  "vocabulary; with model.freeze_lm=false every row trains already (leave it empty)")
            outside = [t for t in self.trainable_tokens if not 0 <= t < self.lm.vocab_size]
            if outside:
                raise ConfigError(f"model.trainable_tokens has ids {outside} outside the vocabulary "
                                  f"[0, model.lm.vocab_size={self.lm.vocab_size})")
            if len(set(self.trainable_tokens)) != len(self.trainable_tokens):
                raise ConfigError(f"model.trainable_tokens={self.trainable_tokens} lists an id twice")
        shared = sorted({"linear_qkv", "linear_proj"} & set(self.lora.targets))
        if self.lora.enabled and self.fusion.share_projections and shared:
            raise ConfigError(f"model.lora.targets has {shared}, which model.fusion.share_projections=true "
                              "also uses for the image keys/values of CASA; adapt only the MLP "
                              "(model.lora.targets=[linear_fc1,linear_fc2]) or give CASA its own projections")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r} not in {TRANSFORMER_IMPLS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r} not in {ATTENTION_BACKENDS}")
        self.recompute.validate()

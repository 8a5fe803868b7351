"""Dataclass schema of the model and its parallel layout.

Defaults describe a tiny CPU model; YAML files in ``configs/`` and ``key=value`` overrides move
it to real scales. ``validate`` methods fail before any work with a message naming the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


from casa_megatron.config.errors import ConfigError
from casa_megatron.data.config import DataConfig

__all__ = ["ConfigError", "DataConfig"]

FUSION_MECHANISMS = ("casa", "cross_attention", "insertion")
PLACEMENTS = ("parallel", "before", "replace")
IMAGE_POSITION_SCHEMES = ("auto", "insertion", "mrope", "none")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "torch", "flash", "te", "torch_varlen")
RECOMPUTE_GRANULARITIES = ("none", "full")
RECOMPUTE_METHODS = ("uniform", "block")


ROPE_SCALING_TYPES = ("none", "linear", "llama3")
LM_FAMILIES = ("generic", "qwen2", "qwen2_5_vl", "helium", "llama")


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
    Numerics are unchanged (same kernels, the RNG states replayed)."""

    granularity: str = "none"  # none | full
    method: str = "uniform"
    num_layers: int = 1

    def validate(self, where: str = "model.recompute") -> None:
        if self.granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"{where}.granularity={self.granularity!r} not in {RECOMPUTE_GRANULARITIES}")
        if self.method not in RECOMPUTE_METHODS:
            raise ConfigError(f"{where}.method={self.method!r} not in {RECOMPUTE_METHODS}")

    @property
    def enabled(self) -> bool:
        return self.granularity != "none"


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

    @property
    def padded_ffn_hidden_size(self) -> int:
        m = self.ffn_pad_multiple
        return -(-self.ffn_hidden_size // m) * m

    @property
    def patch_dim(self) -> int:
        """Width of one pixel patch row: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

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
    ``recompute``: activation recomputation of decoder layers (``RecomputeConfig``)."""

    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    freeze_lm: bool = False
    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    packed_attention: bool = True
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)

    def validate(self) -> None:
        self.lm.validate()
        self.vision.validate()
        self.fusion.validate(self.lm.num_layers)
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r} not in {TRANSFORMER_IMPLS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r} not in {ATTENTION_BACKENDS}")
        self.recompute.validate()


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Data-parallel communication hidden behind compute (Megatron-LM's --overlap-grad-reduce,
    # --overlap-param-gather, --ddp-bucket-size): gradients are reduced bucket by bucket while
    # backward still runs; with the distributed optimizer, updated parameters are all-gathered
    # bucket by bucket during the next forward instead of at the end of the optimizer step.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None  # elements per bucket; None = megatron's default

    def validate(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        lm = model.lm
        for name, value in (("num_attention_heads", lm.num_attention_heads),
                            ("num_query_groups", lm.num_query_groups)):
            if value % tp:
                raise ConfigError(
                    f"parallel.tensor_model_parallel_size={tp} does not divide model.lm.{name}={value}"
                )
        if lm.padded_vocab_size % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide the padded vocabulary "
                f"({lm.padded_vocab_size} = model.lm.vocab_size={lm.vocab_size} rounded up to "
                f"model.lm.make_vocab_size_divisible_by={lm.make_vocab_size_divisible_by}); raise the latter"
            )
        if model.vision.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"model.vision.num_attention_heads={model.vision.num_attention_heads}"
            )
        vision = model.vision
        if vision.padded_ffn_hidden_size % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide the vision MLP width "
                f"{vision.padded_ffn_hidden_size} (model.vision.ffn_hidden_size={vision.ffn_hidden_size} padded to "
                f"model.vision.ffn_pad_multiple={vision.ffn_pad_multiple}); set ffn_pad_multiple to a "
                f"multiple of {tp} (e.g. 64: exact, zero units)"
            )
        if vision.projector_width(lm.hidden_size) % tp:
            raise ConfigError(f"parallel.tensor_model_parallel_size={tp} does not divide the projector width "
                              f"{vision.projector_width(lm.hidden_size)} (model.vision.projector_hidden_size)")
        if lm.num_layers % pp:
            raise ConfigError(
                f"parallel.pipeline_model_parallel_size={pp} does not divide model.lm.num_layers={lm.num_layers}"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce=true "
                              "(as in Megatron-LM)")
        if self.ddp_bucket_size is not None and not self.overlap_grad_reduce:
            raise ConfigError(f"parallel.ddp_bucket_size={self.ddp_bucket_size} has no effect without "
                              "parallel.overlap_grad_reduce=true (megatron keeps one bucket then)")


@dataclass
class OptimizerConfig:
    """AdamW (megatron's, distributed over data-parallel ranks by default) with separate learning
    rates for new weights (CASA, projector: ``lr_new``) and pretrained ones (``lr_pretrained``),
    and a warmup -> constant -> decay schedule (``decay_style: WSD``, the paper's recipe)."""

    lr_new: float = 1e-4
    lr_pretrained: float = 1e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 10
    decay_style: str = "WSD"  # constant | linear | cosine | WSD
    wsd_decay_steps: int = 0  # WSD: steps of the final decay (0 = no decay)
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True

    def validate(self, train_steps: int) -> None:
        styles = ("constant", "linear", "cosine", "WSD")
        if self.decay_style not in styles:
            raise ConfigError(f"optimizer.decay_style={self.decay_style!r} not in {styles}")
        if self.lr_new <= 0 or self.lr_pretrained <= 0:
            raise ConfigError("optimizer.lr_new and optimizer.lr_pretrained must be > 0")
        if self.warmup_steps + self.wsd_decay_steps > train_steps:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} + optimizer.wsd_decay_steps="
                              f"{self.wsd_decay_steps} exceed train_steps={train_steps}")


OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")  # megatron's distrib_optim_sharding_type


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing; ``dir`` None = ``<run_dir>/checkpoints``."""

    dir: Optional[str] = None
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM)
    resume: bool = True  # continue from the newest complete checkpoint in ``dir`` (docs/training.md)
    keep_last: int = 2
    verify: str = "checksum"  # resume checks files against the manifest: checksum (CRC-32) | size
    # Megatron-LM's --async-save: model and optimizer shards are written by a background process
    # while training goes on; the checkpoint counts (is renamed from .tmp) once every rank's
    # writer finished (training/checkpoint_async.py).
    async_save: bool = False
    # How the distributed optimizer's state is saved (megatron's distrib_optim_sharding_type):
    # ``fully_reshardable`` (default) resumes at any TP / PP / DP layout, but data-parallel rank 0
    # gathers its replica's whole optimizer state at every save; ``dp_reshardable`` (Megatron-LM's
    # default) has every rank write its own shard, no gather, and resumes at another DP size only
    # (same TP and PP: a resume that changes them is refused before anything is written).
    optimizer_format: str = "fully_reshardable"

    def validate(self) -> None:
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ConfigError(f"checkpoint.optimizer_format={self.optimizer_format!r} not in {OPTIMIZER_FORMATS}")
    # An imported checkpoint (``casa-convert import-hf``) to start from: weights only, with a
    # fresh optimizer, scheduler and data order. A checkpoint in ``dir`` (resume) takes
    # precedence. The model architecture is read from it (see casa_megatron/config/pretrained.py).
    pretrained: Optional[str] = None


@dataclass
class PrecisionConfig:
    """bf16 runs anywhere (CPU bf16 matmuls work: tests train every fusion and encoder in bf16 on
    CPU); FP8 needs a GPU and Transformer Engine."""

    bf16: bool = False
    fp8: Optional[str] = None  # None | "hybrid" | "e4m3"
    fp8_recipe: str = "delayed"

    def validate(self, transformer_impl: str) -> None:
        import torch

        if self.fp8 is not None:
            if self.fp8 not in ("hybrid", "e4m3"):
                raise ConfigError(f"precision.fp8={self.fp8!r} not in (None, 'hybrid', 'e4m3')")
            if not torch.cuda.is_available():
                raise ConfigError(f"precision.fp8={self.fp8!r} needs a GPU; none is visible")
            if transformer_impl == "local":
                raise ConfigError("precision.fp8 needs model.transformer_impl='transformer_engine' or 'auto'")
            try:
                import transformer_engine  # noqa: F401
            except Exception as exc:
                raise ConfigError(f"precision.fp8={self.fp8!r} needs Transformer Engine: {exc}") from exc


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "casa_megatron"
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else sqlite in the run dir
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    # Peak dense TFLOP/s of one device for the logged ``mfu`` (model FLOPs / peak); None: from
    # the GPU's name and the precision (training/throughput.py), no mfu where unknown (CPU).
    peak_tflops: Optional[float] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_steps: int = 200
    log_interval: int = 10
    eval_interval: int = 0  # steps between validation losses on data.valid (and at the end); 0 = never
    eval_iters: int = 1  # global batches of data.valid per evaluation
    # Megatron-LM's --calculate-per-token-loss: the loss of a step is the sum over every answer
    # token of the global batch divided by their number (every token weighs the same), instead of
    # the mean of per-micro-batch means (a packed micro-batch with few answer tokens weighs as
    # much as one with many)
    calculate_per_token_loss: bool = False
    # Megatron-LM's --rampup-batch-size: [start, increment, ramp_samples]. The global batch starts
    # at ``start`` and grows by ``increment`` at even steps of consumed samples until it reaches
    # global_batch_size after ``ramp_samples`` (training/batch_schedule.py). None = constant.
    rampup_batch_size: Optional[List[int]] = None
    # Megatron-LM's --exit-duration-in-mins: once the run has been going this long (set-up
    # included), finish the step, save and exit 0 like SIGTERM does. For a scheduler's time limit
    # without a warning signal; None = no limit.
    exit_duration_mins: Optional[float] = None
    seed: int = 1234
    run_dir: str = "runs/tiny_cpu"

    def validate(self) -> None:
        self.model.validate()
        self.parallel.validate(self.model)
        self.data.validate()
        self.optimizer.validate(self.train_steps)
        self.checkpoint.validate()
        if self.parallel.overlap_param_gather and not self.optimizer.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true "
                              "(without it every rank updates all parameters: there is nothing to gather)")
        if self.precision.fp8 is not None and self.model.recompute.enabled:
            raise ConfigError(f"model.recompute.granularity={self.model.recompute.granularity!r} with precision.fp8="
                              f"{self.precision.fp8!r} is not supported yet: the recomputed forward must replay FP8 "
                              "scaling state (Transformer Engine's checkpoint), which no GPU run has checked")
        self.precision.validate(self.model.transformer_impl)
        t_data, t_model = self.data.temporal_patch_size, self.model.vision.temporal_patch_size
        if t_data is not None and t_data != t_model:
            raise ConfigError(f"data.temporal_patch_size={t_data} disagrees with model.vision.temporal_patch_size="
                              f"{t_model}; leave data.temporal_patch_size unset (it follows the encoder)")
        if self.eval_interval < 0 or self.eval_iters < 1:
            raise ConfigError(f"eval_interval={self.eval_interval} must be >= 0 and eval_iters={self.eval_iters} >= 1")
        if self.eval_interval and not self.data.valid:
            raise ConfigError(f"eval_interval={self.eval_interval} needs validation sources in data.valid")
        if self.rampup_batch_size is not None:
            ramp = self.rampup_batch_size
            if len(ramp) != 3 or any(not isinstance(v, int) for v in ramp):
                raise ConfigError(f"rampup_batch_size={ramp} must be three integers: [start, increment, ramp_samples]")
            start, increment, samples = ramp
            if not (1 <= start < self.global_batch_size) or increment < 1 or samples < 1:
                raise ConfigError(f"rampup_batch_size={ramp}: needs 1 <= start < global_batch_size="
                                  f"{self.global_batch_size}, increment >= 1 and ramp_samples >= 1")
            if (self.global_batch_size - start) % increment:
                raise ConfigError(f"rampup_batch_size={ramp}: global_batch_size - start = "
                                  f"{self.global_batch_size - start} is not a multiple of the increment {increment}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if self.parallel.sequence_parallel and (
                self.data.seq_length % self.parallel.tensor_model_parallel_size
                or self.data.image_seq_length % self.parallel.tensor_model_parallel_size):
            raise ConfigError("data.seq_length and data.image_seq_length must be multiples of "
                              "parallel.tensor_model_parallel_size with sequence_parallel=true")

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
IMAGE_POSITION_SCHEMES = ("insertion", "none")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "torch", "flash", "te")


@dataclass
class LanguageModelConfig:
    """GPT-style decoder: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias (Qwen2 / Helium family)."""

    vocab_size: int = 512
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

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.lm.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.lm.num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.lm.hidden_size={self.hidden_size} is not divisible by "
                f"model.lm.num_attention_heads={self.num_attention_heads}; set model.lm.kv_channels"
            )


@dataclass
class VisionConfig:
    """Vision encoder: ViT over 14 px patches, then a 2x2 spatial merge in the projector.

    ``trainable_blocks``: -1 trains every block, 0 freezes the encoder, k > 0 trains the last k
    blocks (the paper trains the last 4 for images and freezes the encoder for video).
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
    trainable_blocks: int = -1
    projector_trainable: bool = True

    def validate(self) -> None:
        if self.encoder != "tiny_vit":
            raise ConfigError(f"model.vision.encoder={self.encoder!r}: only 'tiny_vit' is built so far")
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
    ``image_position_scheme``: RoPE for image keys; ``insertion`` (default) rotates every image
    key by the text position of its window start, so the query-key phase depends only on the
    distance from the window start, like text; ``none`` leaves image keys unrotated.
    ``normalize_images``: image tokens go through the CASA layer's pre-attention norm, like the
    text (default; ``false`` feeds the raw projector output, an ablation: see docs/benchmarks.md).
    """

    mechanism: str = "casa"
    placement: str = "parallel"
    cross_attention_gate: bool = False  # Flamingo/mllama tanh gate (init 0), cross_attention only
    share_projections: bool = False
    layers: Optional[List[int]] = None
    every_n: Optional[int] = None
    image_position_scheme: str = "insertion"
    normalize_images: bool = True
    init_from_self_attention: bool = True

    def fusion_layers(self, num_layers: int) -> List[int]:
        """0-based LM layer indices that hold a CASA module (none for insertion)."""
        if self.mechanism == "insertion":
            return []
        if self.layers is not None:
            return sorted(set(self.layers))
        n = self.every_n or 1
        return [i for i in range(num_layers) if (i + 1) % n == 0]

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
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    freeze_lm: bool = False
    transformer_impl: str = "auto"
    attention_backend: str = "auto"

    def validate(self) -> None:
        self.lm.validate()
        self.vision.validate()
        self.fusion.validate(self.lm.num_layers)
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r} not in {TRANSFORMER_IMPLS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r} not in {ATTENTION_BACKENDS}")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def validate(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        lm = model.lm
        for name, value in (("num_attention_heads", lm.num_attention_heads),
                            ("num_query_groups", lm.num_query_groups)):
            if value % tp:
                raise ConfigError(
                    f"parallel.tensor_model_parallel_size={tp} does not divide model.lm.{name}={value}"
                )
        if model.vision.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"model.vision.num_attention_heads={model.vision.num_attention_heads}"
            )
        if lm.num_layers % pp:
            raise ConfigError(
                f"parallel.pipeline_model_parallel_size={pp} does not divide model.lm.num_layers={lm.num_layers}"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")


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


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing; ``dir`` None = ``<run_dir>/checkpoints``."""

    dir: Optional[str] = None
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM)
    resume: bool = True  # continue from the latest complete checkpoint in ``dir``
    keep_last: int = 2


@dataclass
class PrecisionConfig:
    """bf16 and FP8 need a GPU; FP8 also needs Transformer Engine."""

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
        if self.bf16 and not torch.cuda.is_available():
            raise ConfigError("precision.bf16=true: bf16 training is supported on GPU only here")


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "casa_megatron"
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else sqlite in the run dir
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0


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
    seed: int = 1234
    run_dir: str = "runs/tiny_cpu"

    def validate(self) -> None:
        self.model.validate()
        self.parallel.validate(self.model)
        self.data.validate()
        self.optimizer.validate(self.train_steps)
        self.precision.validate(self.model.transformer_impl)
        if self.eval_interval < 0 or self.eval_iters < 1:
            raise ConfigError(f"eval_interval={self.eval_interval} must be >= 0 and eval_iters={self.eval_iters} >= 1")
        if self.eval_interval and not self.data.valid:
            raise ConfigError(f"eval_interval={self.eval_interval} needs validation sources in data.valid")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if self.parallel.sequence_parallel and (
                self.data.seq_length % self.parallel.tensor_model_parallel_size
                or self.data.image_seq_length % self.parallel.tensor_model_parallel_size):
            raise ConfigError("data.seq_length and data.image_seq_length must be multiples of "
                              "parallel.tensor_model_parallel_size with sequence_parallel=true")

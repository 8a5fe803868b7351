"""Dataclass schema of a training run: parallel layout, optimizer, checkpoints, precision,
tracking, profiling and the whole ``TrainConfig``; the model's part (language model, vision
encoder, fusion, recomputation) is in ``model_schema.py`` and re-exported here.

Defaults describe a tiny CPU model; YAML files in ``configs/`` and ``key=value`` overrides move
it to real scales. ``validate`` methods fail before any work with a message naming the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from casa_megatron.config.errors import ConfigError
from casa_megatron.config.model_schema import (  # noqa: F401  (re-exported: one import place for configs)
    FUSION_MECHANISMS,
    PLACEMENTS,
    IMAGE_POSITION_SCHEMES,
    TRANSFORMER_IMPLS,
    ATTENTION_BACKENDS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    ROPE_SCALING_TYPES,
    LM_FAMILIES,
    RopeScalingConfig,
    LanguageModelConfig,
    VISION_ENCODERS,
    RecomputeConfig,
    VisionConfig,
    FusionConfig,
    LORA_TARGETS,
    LoRAConfig,
    ModelConfig,
)
from casa_megatron.config.pipeline_split import stage_layer_counts, virtual_stage_layer_counts, vision_stage_blocks
from casa_megatron.data.config import DataConfig

__all__ = ["ConfigError", "DataConfig"]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Uneven pipeline split (Megatron-LM's --decoder-first/last-pipeline-num-layers): LM layers on
    # the first / last stage; the middle stages share the rest evenly. The first stage also runs
    # the vision encoder and the projector, so it usually wants fewer layers
    # (config/pipeline_split.py; benchmarks/pipeline_balance.py suggests the counts).
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    # The vision encoder over several stages: its blocks on each of the first len(list) stages
    # (e.g. [20, 12]). The stages before the last of them hold no LM layer; the LM is split over
    # the rest (num_layers_in_first_pipeline_stage then counts the first of those). For CASA at
    # the paper's shape, where the encoder is most of a step's FLOPs.
    vision_blocks_per_pipeline_stage: Optional[List[int]] = None
    # Interleaved pipeline schedule (Megatron-LM's --num-virtual-stages-per-pipeline-rank): each
    # rank holds this many model chunks, chunk v of rank r being virtual stage v * pp + r; the pipeline's idle time shrinks by this factor. Each
    # rank's layers (even, or uneven with the two fields above) are cut into equal chunks; not
    # with the encoder over several stages. Micro-batches per step: a multiple of
    # pipeline_model_parallel_size.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # Data-parallel communication hidden behind compute (Megatron-LM's --overlap-grad-reduce,
    # --overlap-param-gather, --ddp-bucket-size): gradients are reduced bucket by bucket while
    # backward still runs; with the distributed optimizer, updated parameters are all-gathered
    # bucket by bucket during the next forward instead of at the end of the optimizer step.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None  # elements per bucket; None = megatron's default

    @property
    def vision_stages(self) -> int:
        """How many pipeline stages the vision encoder spans (1: all of it on the first)."""
        split = self.vision_blocks_per_pipeline_stage
        return len(split) if split else 1

    def stage_layer_counts(self, num_layers: int) -> List[int]:
        """LM layers on each pipeline stage (``ConfigError`` if this layout cannot split them)."""
        return stage_layer_counts(num_layers, self.pipeline_model_parallel_size,
                                  self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage,
                                  self.vision_stages)

    @property
    def model_chunks(self) -> int:
        """Model chunks per pipeline rank (1 without the interleaved schedule)."""
        return self.virtual_pipeline_model_parallel_size or 1

    def virtual_stage_layer_counts(self, num_layers: int) -> List[int]:
        """LM layers of each virtual stage, in pipeline order (``ConfigError`` if impossible);
        without the interleaved schedule the stages themselves (``stage_layer_counts``)."""
        if self.virtual_pipeline_model_parallel_size is None:
            return self.stage_layer_counts(num_layers)
        return virtual_stage_layer_counts(num_layers, self.pipeline_model_parallel_size,
                                          self.virtual_pipeline_model_parallel_size,
                                          self.num_layers_in_first_pipeline_stage,
                                          self.num_layers_in_last_pipeline_stage, self.vision_stages)

    def stage_vision_blocks(self, num_blocks: int) -> List[int]:
        """Vision-encoder blocks on each pipeline stage (``ConfigError`` if the split is impossible)."""
        return vision_stage_blocks(num_blocks, self.pipeline_model_parallel_size,
                                   self.vision_blocks_per_pipeline_stage)

    def validate(self, model: ModelConfig) -> None:
        tp = self.tensor_model_parallel_size
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
        self.stage_vision_blocks(vision.num_layers)
        self.stage_layer_counts(lm.num_layers)
        self.virtual_stage_layer_counts(lm.num_layers)
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
    adam_eps: float = 1e-8  # Megatron-LM's --adam-eps (1e-5 / 1e-6 are common for long bf16 runs)
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
    # The tokenizer's files in every checkpoint (tokenizer/, Megatron-Bridge's save_tokenizer_assets):
    # export-hf and casa-eval read them there, whatever became of data.tokenizer_path.
    save_tokenizer: bool = True
    # Megatron-LM's --no-load-optim (Megatron-Bridge's load_optim=False): a resume takes the
    # weights, step, LR schedule and data position but starts the optimizer afresh (Adam's moments
    # at zero, the fp32 main weights copied from the loaded ones). For a checkpoint whose
    # optimizer state is unusable or bound to what is changing (which weights train, the
    # optimizer's kind or its dp_reshardable layout). A one-off override: each resume with it set
    # drops the optimizer state again.
    load_optimizer: bool = True

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


PROFILE_TOOLS = ("torch", "nsys")


@dataclass
class GenerationEvalConfig:
    """Held-out questions and clips answered by greedy generation during training, scored as
    ``casa-eval`` scores them (``training/generation_eval.py``): the accuracy curve beside the
    loss curve, which is what a fusion comparison reads. ``data``: a held-out folder as
    ``casa-eval --data`` takes it; ``interval``: steps between evaluations (and at the end); the
    first ``max_samples`` items, ``max_new_tokens`` per answer, ``batch_size`` questions (or clips)
    per forward (one row each; in float32 each item gets the tokens it gets alone, only faster)."""

    data: Optional[str] = None
    interval: int = 0  # 0 = never
    max_samples: Optional[int] = 16
    max_new_tokens: int = 16
    batch_size: int = 8
    media_root: Optional[str] = None  # where relative media paths of ``data`` resolve (casa-eval's --media-root)

    def validate(self) -> None:
        if self.interval and not self.data:
            raise ConfigError(f"eval_generation.interval={self.interval} needs eval_generation.data (a held-out folder)")


@dataclass
class ProfileConfig:
    """Megatron-LM's ``--profile``: steps ``start_step`` .. ``end_step`` (inclusive) of ``ranks``
    are profiled (``training/profiling.py``). ``torch``: ``torch.profiler`` (CPU, and CUDA kernels
    on a GPU) writes ``<run_dir>/profile/rank<R>_steps<A>-<B>.json`` (a Chrome trace: open it in
    chrome://tracing or ui.perfetto.dev) and ``..._ops.txt`` (operators by self time). ``nsys``
    (GPU): ``cudaProfilerStart/Stop`` around those steps and an NVTX range per step, for
    ``nsys profile --capture-range=cudaProfilerApi casa-train ...``. ``memory_history`` (GPU):
    torch's CUDA allocator history over those steps, dumped as ``..._memory.pickle``
    (pytorch.org/memory_viz)."""

    enabled: bool = False
    start_step: int = 10
    end_step: int = 11
    ranks: List[int] = field(default_factory=lambda: [0])
    tool: str = "torch"
    record_shapes: bool = False
    with_stack: bool = False
    memory_history: bool = False

    def validate(self, train_steps: int) -> None:
        if not self.enabled:
            return
        import torch

        if self.tool not in PROFILE_TOOLS:
            raise ConfigError(f"profile.tool={self.tool!r} not in {PROFILE_TOOLS}")
        if not 1 <= self.start_step <= self.end_step:
            raise ConfigError(f"profile.start_step={self.start_step} and profile.end_step={self.end_step} must "
                              "satisfy 1 <= start_step <= end_step")
        if self.start_step > train_steps:
            raise ConfigError(f"profile.start_step={self.start_step} is after the last step (train_steps="
                              f"{train_steps}): nothing would be profiled")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ConfigError(f"profile.ranks={self.ranks} must list global ranks >= 0")
        if (self.tool == "nsys" or self.memory_history) and not torch.cuda.is_available():
            what = "profile.tool='nsys'" if self.tool == "nsys" else "profile.memory_history=true"
            raise ConfigError(f"{what} profiles CUDA work and needs a GPU; none is visible (profile.tool='torch' "
                              "traces the CPU)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval_generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_steps: int = 200
    log_interval: int = 10
    # Megatron-LM's --log-params-norm: the L2 norm of the trained weights in every logged row
    # (``params_norm``; training/params_norm.py). A collective over TP x PP at each logged step.
    log_params_norm: bool = False
    # Megatron-LM's --check-weight-hash-across-dp-replicas-interval: every N steps every weight is
    # hashed on every rank and the data-parallel replicas compared; a difference stops the run
    # naming the weights (training/replica_check.py). 0 = never.
    check_weights_across_dp_interval: int = 0
    # Megatron-LM's --manual-gc --manual-gc-interval N: Python's automatic garbage collection off
    # during training, a collection every N steps on every rank (training/manual_gc.py). 0 = off.
    manual_gc_interval: int = 0
    eval_interval: int = 0  # steps between validation losses on data.valid (and at the end); 0 = never
    eval_iters: int = 1  # global batches of data.valid per evaluation
    # Megatron-LM's --skip-train: no training step. The checkpoint the run would resume from (the
    # newest in checkpoint.dir), else checkpoint.pretrained, is scored at this run's layout: the
    # validation loss on data.valid (eval_iters global batches) and the answers to
    # eval_generation.data (training/eval_only.py). The scores go to <run_dir>/evaluations/ and to
    # the MLflow run that trained the checkpoint; nothing else is written (no checkpoint,
    # config.yaml or metrics.jsonl).
    skip_train: bool = False
    # with skip_train: ``latest`` scores the checkpoint above; ``all`` scores every finished
    # checkpoint in checkpoint.dir, oldest first (the held-out curve of a finished run on data
    # chosen after it; a damaged checkpoint is skipped and counted). One model, loaded in turn.
    skip_train_checkpoints: str = "latest"
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
        self.profile.validate(self.train_steps)
        self.eval_generation.validate()
        t_data, t_model = self.data.temporal_patch_size, self.model.vision.temporal_patch_size
        if t_data is not None and t_data != t_model:
            raise ConfigError(f"data.temporal_patch_size={t_data} disagrees with model.vision.temporal_patch_size="
                              f"{t_model}; leave data.temporal_patch_size unset (it follows the encoder)")
        if self.eval_interval < 0 or self.eval_iters < 1:
            raise ConfigError(f"eval_interval={self.eval_interval} must be >= 0 and eval_iters={self.eval_iters} >= 1")
        if self.skip_train and not self.data.valid and not self.eval_generation.data:
            raise ConfigError("skip_train=true scores a checkpoint and needs something to score it on: data.valid "
                              "(the validation loss) and / or eval_generation.data (answers by generation)")
        if self.skip_train_checkpoints == "all" and not (self.skip_train and self.checkpoint.resume):
            raise ConfigError("skip_train_checkpoints=all scores the checkpoints of checkpoint.dir: it needs "
                              "skip_train=true and checkpoint.resume=true")
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

"""Value ranges of single fields, as a table: zero or negative sizes, steps and intervals fail as
config errors naming the field, instead of a ``ZeroDivisionError`` or an assert inside megatron.

Keyed by dataclass and field name (not by dotted path), so the rules hold wherever a section is
embedded and whatever the root (``TrainConfig`` or ``ModelConfig``). Cross-field contradictions
stay in each dataclass's ``validate()``. A field missing here has no range rule; a rule naming a
field that no longer exists is caught by a test.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional

from casa_megatron.config.coerce import type_name, walk
from casa_megatron.config.errors import ConfigError


@dataclass(frozen=True)
class Range:
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # True: value > low (else >= low)
    high_open: bool = False  # True: value < high (else <= high)

    def accepts(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
BETA = Range(0, 1, high_open=True)


def rules() -> Dict[type, Dict[str, Range]]:
    """The range table: dataclass -> field -> Range."""
    # Imported here: the schema imports this package.
    from casa_megatron.config import schema
    from casa_megatron.data.config import DataConfig

    sizes = dict.fromkeys(("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"), AT_LEAST_1)
    return {
        schema.LanguageModelConfig: {**sizes, "vocab_size": AT_LEAST_1, "num_query_groups": AT_LEAST_1,
                                     "kv_channels": AT_LEAST_1, "max_position_embeddings": AT_LEAST_1,
                                     "rotary_base": POSITIVE, "norm_epsilon": POSITIVE, "init_method_std": POSITIVE,
                                     "make_vocab_size_divisible_by": AT_LEAST_1},
        schema.RopeScalingConfig: {"factor": POSITIVE, "low_freq_factor": POSITIVE, "high_freq_factor": POSITIVE,
                                   "original_max_position_embeddings": AT_LEAST_1},
        schema.VisionConfig: {**sizes, "patch_size": AT_LEAST_1, "in_channels": AT_LEAST_1,
                              "spatial_merge_size": AT_LEAST_1, "norm_epsilon": POSITIVE,
                              "temporal_patch_size": AT_LEAST_1, "window_size": AT_LEAST_1, "rope_theta": POSITIVE,
                              "tokens_per_second": POSITIVE, "projector_hidden_size": AT_LEAST_1,
                              "ffn_pad_multiple": AT_LEAST_1, "trainable_blocks": Range(-1)},
        schema.FusionConfig: {"every_n": AT_LEAST_1},
        schema.RecomputeConfig: {"num_layers": AT_LEAST_1},
        schema.ParallelConfig: {"tensor_model_parallel_size": AT_LEAST_1, "pipeline_model_parallel_size": AT_LEAST_1,
                                "num_layers_in_first_pipeline_stage": AT_LEAST_1,
                                "num_layers_in_last_pipeline_stage": AT_LEAST_1, "ddp_bucket_size": AT_LEAST_1,
                                "virtual_pipeline_model_parallel_size": AT_LEAST_1},
        schema.OptimizerConfig: {"lr_new": POSITIVE, "lr_pretrained": POSITIVE, "min_lr_ratio": FRACTION,
                                 "weight_decay": AT_LEAST_0, "adam_beta1": BETA, "adam_beta2": BETA, "adam_eps": POSITIVE,
                                 "warmup_steps": AT_LEAST_0, "wsd_decay_steps": AT_LEAST_0, "clip_grad": AT_LEAST_0},
        schema.CheckpointConfig: {"save_interval": AT_LEAST_0, "keep_last": AT_LEAST_0},
        schema.TrackingConfig: {"system_metrics_interval_s": POSITIVE, "peak_tflops": POSITIVE},
        schema.ProfileConfig: {"start_step": AT_LEAST_1, "end_step": AT_LEAST_1},
        schema.GenerationEvalConfig: {"interval": AT_LEAST_0, "max_samples": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                                       "batch_size": AT_LEAST_1},
        schema.TrainConfig: {"micro_batch_size": AT_LEAST_1, "global_batch_size": AT_LEAST_1,
                             "train_steps": AT_LEAST_1, "log_interval": AT_LEAST_1, "seed": AT_LEAST_0,
                             "exit_duration_mins": POSITIVE, "check_weights_across_dp_interval": AT_LEAST_0,
                             "manual_gc_interval": AT_LEAST_0},
        DataConfig: {"seq_length": Range(2), "image_seq_length": AT_LEAST_1, "image_size": AT_LEAST_1,
                     "pixel_budget": AT_LEAST_1, "min_pixels": AT_LEAST_1, "video_pixel_budget": AT_LEAST_1,
                     "fps": POSITIVE, "max_frames": AT_LEAST_1, "num_workers": AT_LEAST_0, "prefetch": AT_LEAST_0,
                     "pack_buffer": AT_LEAST_1, "log_interval": AT_LEAST_0, "temporal_patch_size": AT_LEAST_1,
                     "seed": AT_LEAST_0},
    }


def choices() -> Dict[type, Dict[str, tuple]]:
    """Fields with a fixed set of values that no ``validate()`` checks yet."""
    from casa_megatron.config import schema

    return {schema.CheckpointConfig: {"verify": ("checksum", "size")},
            schema.TrainConfig: {"skip_train_checkpoints": ("latest", "all")}}


def check_limits(config: Any) -> None:
    """Raise ConfigError for the first field outside its range (``None`` means unset: allowed)."""
    table, allowed = rules(), choices()
    for path, owner, name in walk(config):
        rule = table.get(type(owner), {}).get(name)
        value = getattr(owner, name)
        options = allowed.get(type(owner), {}).get(name)
        if options is not None and value not in options:
            raise ConfigError(f"{path}={value!r}: must be one of {options}")
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not rule.accepts(value):
            hint = typing.get_type_hints(type(owner))[name]
            raise ConfigError(f"{path}={value!r}: must be {rule.describe()} ({type_name(hint)})")

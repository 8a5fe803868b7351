"""Typed configuration: dataclass schema, YAML loading and ``key=value`` overrides."""

from casa_megatron.config.loader import apply_overrides, load_config, save_config, to_dict
from casa_megatron.config.schema import (
    ConfigError,
    FusionConfig,
    LanguageModelConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "FusionConfig",
    "LanguageModelConfig",
    "LoRAConfig",
    "ModelConfig",
    "ParallelConfig",
    "VisionConfig",
    "apply_overrides",
    "load_config",
    "save_config",
    "to_dict",
]

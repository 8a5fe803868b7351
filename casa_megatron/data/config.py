"""Data configuration (owned by the data pipeline; embedded in the training config as ``data``)."""

from __future__ import annotations

from dataclasses import dataclass

from casa_megatron.config.errors import ConfigError


@dataclass
class DataConfig:
    """``synthetic``: the generated colour/side task (data/synthetic.py)."""

    source: str = "synthetic"
    seq_length: int = 32
    image_seq_length: int = 24
    image_size: int = 56
    seed: int = 0

    def validate(self) -> None:
        if self.source != "synthetic":
            raise ConfigError(f"data.source={self.source!r}: only 'synthetic' exists so far")
        if self.image_size % 28:
            raise ConfigError(f"data.image_size={self.image_size} must be a multiple of 28 (patch 14 x merge 2)")



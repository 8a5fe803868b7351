"""Mapping tables per component, and the registry of vision encoders.

Three components, each with its table and its source in an import: ``lm``, ``vision`` (the
encoder) and ``projector`` (= Qwen2.5-VL's ``visual.merger``, the same module whatever the
encoder). The projector is its own component because a merger maps to the width of the LM it
was trained with: Qwen2.5-VL-3B's encoder goes into Helium-2B (width 2560) but its merger
(2048) does not, and is then initialised fresh, reported.

A vision table builder is ``builder(model: ModelConfig) -> list of rows`` where a row is a
plain ``(megatron_name, hf_name_or_names, transform)`` tuple (or a :class:`Row`), covering the
encoder's ``vision.*`` parameters. ``tiny_vit`` and ``qwen2_5_vl`` are built in; another encoder plugs in with :func:`register_vision_table` (and
its HF config reader in ``hf_config.VISION_CONFIG_READERS``). A checkpoint whose vision kind
has no table is refused by the importer, naming the registered ones (``--skip-vision`` imports
its LM alone).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from casa_megatron.config.schema import ModelConfig
from casa_megatron.conversion.mapping import MappingTable
from casa_megatron.conversion.tables.lm import lm_rows
from casa_megatron.conversion.tables.vision import merger_rows, qwen2_5_vl_rows, tiny_vit_rows

VisionTableBuilder = Callable[[ModelConfig], List]

VISION_TABLES: Dict[str, VisionTableBuilder] = {"tiny_vit": tiny_vit_rows, "qwen2_5_vl": qwen2_5_vl_rows}


def register_vision_table(encoder: str, builder: VisionTableBuilder) -> None:
    VISION_TABLES[encoder] = builder


def lm_table(model: ModelConfig) -> MappingTable:
    return MappingTable("lm", lm_rows(model.lm, model.fusion))


def vision_table(model: ModelConfig, encoder: Optional[str] = None) -> Optional[MappingTable]:
    builder = VISION_TABLES.get(encoder or model.vision.encoder)
    return MappingTable("vision", builder(model)) if builder is not None else None


def projector_table() -> MappingTable:
    return MappingTable("projector", merger_rows())


def tables_for(model: ModelConfig) -> Dict[str, MappingTable]:
    """Every component's table for a model (export uses these; import chooses per source)."""
    tables = {"lm": lm_table(model), "projector": projector_table()}
    vision = vision_table(model)
    if vision is not None:
        tables["vision"] = vision
    return tables


__all__ = ["VISION_TABLES", "lm_table", "merger_rows", "projector_table", "register_vision_table",
           "tables_for", "vision_table"]

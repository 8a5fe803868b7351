"""How the LM's layers are split over pipeline stages, checked before anything is built.

A VLM's first stage holds more than its LM layers: the vision encoder, the projector and the
embedding run there (``model/vlm.py``'s pipeline contract), and the last stage adds the output
layer and the loss. An even split therefore leaves the first stage the slowest, and every other
stage waits on it in each micro-batch's forward and backward. Megatron-LM's answer is the uneven
split (``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``, the
TransformerConfig fields ``num_layers_in_first_pipeline_stage`` / ``..._last_...``): the first and
last stages get the counts given, the middle stages share the rest evenly.
``benchmarks/pipeline_balance.py`` suggests the counts from the FLOPs of each stage.

This module is the rule as data (torch-free, so the config layer can check it); megatron-core's
``get_num_layers_to_build`` / ``get_transformer_layer_offset`` build the stages, and
``tests/config/test_pipeline_split.py`` proves the two agree.
"""

from __future__ import annotations

from itertools import accumulate
from typing import List, Optional

from casa_megatron.config.errors import ConfigError

FIRST = "parallel.num_layers_in_first_pipeline_stage"
LAST = "parallel.num_layers_in_last_pipeline_stage"


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> List[int]:
    """LM layers on each of the ``pp`` stages (``ConfigError`` naming the fields if impossible)."""
    given = ", ".join(f"{n}={v}" for n, v in ((FIRST, first), (LAST, last)) if v is not None)
    if pp == 1:
        if given:
            raise ConfigError(f"{given} needs parallel.pipeline_model_parallel_size > 1 (it is 1: one stage holds "
                              f"all {num_layers} layers)")
        return [num_layers]
    for name, value in ((FIRST, first), (LAST, last)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value}: every pipeline stage needs at least one LM layer "
                              "(megatron-core's rule)")
    ends = [v for v in (first, last) if v is not None]
    if not ends:
        if num_layers % pp or num_layers < pp:
            raise ConfigError(f"parallel.pipeline_model_parallel_size={pp} does not divide model.lm.num_layers="
                              f"{num_layers}; for an uneven split give {FIRST} and/or {LAST}")
        return [num_layers // pp] * pp
    middle_stages = pp - len(ends)
    middle_layers = num_layers - sum(ends)
    if middle_layers < middle_stages or (middle_stages == 0 and middle_layers != 0):
        raise ConfigError(
            f"{given} leaves {middle_layers} of model.lm.num_layers={num_layers} for the {middle_stages} other "
            f"stage(s) of parallel.pipeline_model_parallel_size={pp}"
            + ("; with both ends given they must add up to num_layers" if middle_stages == 0 else
               "; each stage needs at least one layer"))
    if middle_stages and middle_layers % middle_stages:
        raise ConfigError(f"{given}: the {middle_stages} other stage(s) share the remaining {middle_layers} layers "
                          f"evenly, and {middle_stages} does not divide {middle_layers}")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_offsets(counts: List[int]) -> List[int]:
    """Global index of each stage's first LM layer."""
    return [0, *accumulate(counts)][:-1]


def describe_split(counts: List[int]) -> str:
    """``4 stages: layers 0-5 | 6-12 | ...`` for logs and tool output."""
    spans = [f"{o}-{o + c - 1}" if c > 1 else str(o) for o, c in zip(stage_offsets(counts), counts)]
    return f"{len(counts)} stage{'s' if len(counts) > 1 else ''}: layers " + " | ".join(spans)

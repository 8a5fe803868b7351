"""How the LM's layers are split over pipeline stages, checked before anything is built.

A VLM's first stage holds more than its LM layers: the vision encoder, the projector and the
embedding run there (``model/vlm.py``'s pipeline contract), and the last stage adds the output
layer and the loss. An even split therefore leaves the first stage the slowest, and every other
stage waits on it in each micro-batch's forward and backward. Megatron-LM's answer is the uneven
split (``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``, the
TransformerConfig fields ``num_layers_in_first_pipeline_stage`` / ``..._last_...``): the first and
last stages get the counts given, the middle stages share the rest evenly.
``benchmarks/pipeline_balance.py`` suggests the counts from the FLOPs of each stage.

With virtual stages (the interleaved schedule, ``virtual_stage_layer_counts``) each rank holds
several model chunks instead: its stage's layers (even or uneven) cut into equal chunks.

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
VISION = "parallel.vision_blocks_per_pipeline_stage"
VIRTUAL = "parallel.virtual_pipeline_model_parallel_size"


def vision_stage_blocks(num_blocks: int, pp: int, split: Optional[List[int]] = None) -> List[int]:
    """Vision-encoder blocks on each of the ``pp`` stages: all on the first without a split.

    With ``split`` (``parallel.vision_blocks_per_pipeline_stage``) the encoder spans the first
    ``len(split)`` stages. Why: at the paper's shape the encoder is 77 % of a CASA step's FLOPs,
    so no split of the LM alone balances a pipeline whose first stage holds the whole encoder
    (docs/benchmarks.md, "Pipeline split")."""
    if split is None:
        return [num_blocks] + [0] * (pp - 1)
    split = list(split)
    if len(split) < 2:
        raise ConfigError(f"{VISION}={split}: a split over one stage is the default (leave it unset); give the "
                          "encoder blocks of each of the first two or more stages")
    if len(split) > pp:
        raise ConfigError(f"{VISION}={split} names {len(split)} stages but parallel.pipeline_model_parallel_size={pp}")
    if any(n < 1 for n in split):
        raise ConfigError(f"{VISION}={split}: every stage it names needs at least one encoder block")
    if sum(split) != num_blocks:
        raise ConfigError(f"{VISION}={split} adds up to {sum(split)} blocks but model.vision.num_layers={num_blocks}")
    return split + [0] * (pp - len(split))


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None, vision_stages: int = 1) -> List[int]:
    """LM layers on each of the ``pp`` stages (``ConfigError`` naming the fields if impossible).

    ``vision_stages`` > 1: the encoder spans that many stages (``vision_stage_blocks``); the
    stages before its last one hold no LM layer (the CASA and insertion layers need the finished
    image tokens), and the LM is split over the remaining ``pp - vision_stages + 1`` stages by
    the same rule: ``FIRST`` then counts the layers of the first stage that holds any (the
    encoder's last stage), ``LAST`` those of the last stage."""
    given = ", ".join(f"{n}={v}" for n, v in ((FIRST, first), (LAST, last)) if v is not None)
    if vision_stages > 1:
        lm_stages = pp - vision_stages + 1
        if lm_stages == 1:
            if given:
                raise ConfigError(f"{given}: with the encoder over {vision_stages} of the {pp} stages ({VISION}) "
                                  f"the last stage holds all {num_layers} LM layers; leave it unset")
            counts = [num_layers]
        else:
            try:
                counts = stage_layer_counts(num_layers, lm_stages, first, last)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (with the encoder over {vision_stages} stages ({VISION}), the LM is "
                                  f"split over the last {lm_stages} of the {pp} stages; {FIRST} counts the "
                                  f"first of them)") from None
        return [0] * (vision_stages - 1) + counts
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


def virtual_stage_layer_counts(num_layers: int, pp: int, vp: int, first: Optional[int] = None,
                               last: Optional[int] = None, vision_stages: int = 1) -> List[int]:
    """LM layers of each *virtual* stage under the interleaved schedule (``VIRTUAL`` = ``vp``
    model chunks per rank, Megatron-LM's ``--num-virtual-stages-per-pipeline-rank``), in pipeline
    order: virtual stage ``v * pp + r`` is chunk ``v`` of rank ``r``.

    Why chunks: 1F1B idles each rank for ``(pp - 1)`` micro-batch times per step; with ``vp``
    chunks per rank a micro-batch crosses every rank ``vp`` times in smaller pieces and the idle
    time shrinks to ``(pp - 1) / vp`` of that (more point-to-point messages in exchange).

    Each rank's layers are its stage's (``stage_layer_counts``: even, or uneven with ``FIRST`` /
    ``LAST``, as megatron-core does with virtual stages) cut into ``vp`` equal chunks, so every
    stage's count must be a multiple of ``vp``: with ``FIRST=2, LAST=4`` over 6 layers and two
    chunks, rank 0 holds layers 0 and 3, rank 1 layers 1-2 and 4-5. The first chunk of the first
    rank also runs the vision encoder, the last chunk of the last rank the output layer; the
    encoder over several stages (``VISION``) is not combined with chunks."""
    if vp < 2:
        raise ConfigError(f"{VIRTUAL}={vp}: give 2 or more model chunks per rank, or leave it unset")
    if pp < 2:
        raise ConfigError(f"{VIRTUAL}={vp} needs parallel.pipeline_model_parallel_size > 1 (it is {pp})")
    if vision_stages > 1:
        raise ConfigError(f"{VISION} with {VIRTUAL}={vp} is not supported: the vision encoder runs in the first "
                          "model chunk of the first rank")
    ends = [v for v in (first, last) if v is not None]
    if not ends and num_layers % (pp * vp):
        raise ConfigError(f"model.lm.num_layers={num_layers} does not split evenly into {pp * vp} model chunks "
                          f"(parallel.pipeline_model_parallel_size={pp} x {VIRTUAL}={vp}); for an uneven split "
                          f"give {FIRST} and/or {LAST}")
    if len(ends) == 2 and pp == 2:  # megatron-core's interleaved offsets divide by the middle stages
        raise ConfigError(f"{FIRST}={first} and {LAST}={last} with {VIRTUAL}={vp} at parallel.pipeline_model_parallel_"
                          f"size=2: give only {FIRST}={first} (the last stage then holds the other "
                          f"{num_layers - first}); megatron-core cannot place chunks with both ends set and no "
                          "middle stage")
    stages = stage_layer_counts(num_layers, pp, first, last)
    uneven = [f"rank {r}: {c}" for r, c in enumerate(stages) if c % vp]
    if uneven:
        raise ConfigError(f"with {VIRTUAL}={vp} each rank's LM layers are cut into {vp} equal model chunks, and "
                          f"the stages of {'+'.join(map(str, stages))} LM layers do not divide ({'; '.join(uneven)} layers)")
    return [count // vp for _ in range(vp) for count in stages]


def rank_totals(per_virtual_stage: List, pp: int) -> List:
    """Sum a quantity of each virtual stage over the chunks of each of the ``pp`` ranks
    (virtual stages ``r, r + pp, ...`` run on rank ``r``)."""
    return [sum(per_virtual_stage[r::pp]) for r in range(pp)]


def stage_offsets(counts: List[int]) -> List[int]:
    """Global index of each stage's first LM layer."""
    return [0, *accumulate(counts)][:-1]


def _span(offset: int, count: int) -> str:
    return f"{offset}-{offset + count - 1}" if count > 1 else str(offset)


def describe_virtual_split(counts: List[int], pp: int) -> str:
    """``2 ranks x 2 chunks: rank 0 layers 0-1, 4-5 | rank 1 layers 2-3, 6-7`` (``counts``: per
    virtual stage, ``virtual_stage_layer_counts``)."""
    spans = [_span(o, c) for o, c in zip(stage_offsets(counts), counts)]
    ranks = [", ".join(spans[r::pp]) for r in range(pp)]
    return f"{pp} ranks x {len(counts) // pp} chunks: " + " | ".join(
        f"rank {r} layers {text}" for r, text in enumerate(ranks))


def describe_split(counts: List[int], vision_blocks: Optional[List[int]] = None) -> str:
    """``4 stages: layers 0-5 | 6-12 | ...`` for logs and tool output; with the encoder over
    several stages: ``3 stages: encoder blocks 0-19 | encoder blocks 20-31 + layers 0-13 | ...``."""
    plural = f"{len(counts)} stage{'s' if len(counts) > 1 else ''}"
    spans = [_span(o, c) for o, c in zip(stage_offsets(counts), counts)]
    if vision_blocks is None or not any(vision_blocks[1:]):
        return f"{plural}: layers " + " | ".join(spans)
    parts = []
    for stage, (v_offset, blocks) in enumerate(zip(stage_offsets(vision_blocks), vision_blocks)):
        encoder = f"encoder blocks {_span(v_offset, blocks)}" if blocks else ""
        lm = f"layers {spans[stage]}" if counts[stage] else ""
        parts.append(" + ".join(p for p in (encoder, lm) if p))
    return f"{plural}: " + " | ".join(parts)


def megatron_layout(counts: List[int]) -> List[List[str]]:
    """The split as megatron-core's ``pipeline_model_parallel_layout`` (one list per stage):
    its only way to build stages without LM layers, which an encoder over several stages needs
    (``num_layers_in_first_pipeline_stage`` must be at least 1)."""
    layout = [["decoder"] * c for c in counts]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout

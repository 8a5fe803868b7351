"""The pipeline split rule (config/pipeline_split.py) equals megatron-core's, which builds the
stages: for every layout it accepts, the same layer count and first layer index on each stage;
every layout megatron's TransformerConfig refuses, or would build with a missing layer or an empty
stage, is refused from the config alone, naming the fields."""

from __future__ import annotations

import itertools

import pytest
import torch

from casa_megatron.config.errors import ConfigError
from casa_megatron.config.pipeline_split import describe_split, stage_layer_counts, stage_offsets

LAYOUTS = [(n, pp, first, last) for n in (4, 6, 7, 24) for pp in (2, 3, 4)
           for first, last in itertools.product((None, 1, 2, 3, 5), (None, 1, 2, 4))]


def _megatron(num_layers, pp, first, last):
    """(counts, offsets) from megatron-core, or the exception its TransformerConfig raises."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last)
        counts = [get_num_layers_to_build(config, None, rank) for rank in range(pp)]
        offsets = [get_transformer_layer_offset(config, None, rank) for rank in range(pp)]
    except (ValueError, AssertionError) as exc:
        return exc
    # megatron-core 0.16 accepts a few layouts it cannot build: ends that take more than all the
    # layers (a middle stage of -1 layers). Our rule refuses those too.
    if sum(counts) != num_layers or min(counts) < 1:
        return ValueError(f"megatron would build {counts}")
    return counts, offsets


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "n{}-pp{}-first{}-last{}".format(*l))
def test_split_equals_megatron(layout):
    reference = _megatron(*layout)
    if isinstance(reference, Exception):
        with pytest.raises(ConfigError, match="num_layers|pipeline"):
            stage_layer_counts(*layout)
        return
    counts = stage_layer_counts(*layout)
    assert (counts, stage_offsets(counts)) == reference
    assert sum(counts) == layout[0] and min(counts) >= 1


def test_layouts_cover_both_outcomes():
    """The grid above exercises accepted and refused layouts, uneven ones among the accepted."""
    outcomes = [_megatron(*layout) for layout in LAYOUTS]
    accepted = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(accepted) > 30 and len(outcomes) - len(accepted) > 30
    assert any(len(set(counts)) > 1 for counts, _ in accepted)


def test_describe_split():
    assert describe_split([1, 3]) == "2 stages: layers 0 | 1-3"
    assert describe_split([3, 7, 7, 7]) == "4 stages: layers 0-2 | 3-9 | 10-16 | 17-23"

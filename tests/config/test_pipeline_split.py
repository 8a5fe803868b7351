"""The pipeline split rule (config/pipeline_split.py) equals megatron-core's, which builds the
stages: for every layout it accepts, the same layer count and first layer index on each stage;
every layout megatron's TransformerConfig refuses, or would build with a missing layer or an empty
stage, is refused from the config alone, naming the fields."""

from __future__ import annotations

import itertools

import pytest
import torch

from casa_megatron.config.errors import ConfigError
from casa_megatron.config.pipeline_split import (
    describe_split,
    describe_virtual_split,
    megatron_layout,
    stage_layer_counts,
    stage_offsets,
    virtual_stage_layer_counts,
    vision_stage_blocks,
)

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


# --- the vision encoder over several stages (parallel.vision_blocks_per_pipeline_stage) --------
ENCODER_LAYOUTS = [(n, pp, stages, first, last) for n in (4, 7, 24) for pp in (2, 3, 4) for stages in range(2, pp + 1)
                   for first, last in itertools.product((None, 1, 3), (None, 1, 3))]


@pytest.mark.parametrize("layout", ENCODER_LAYOUTS, ids=lambda l: "n{}-pp{}-encoder{}-first{}-last{}".format(*l))
def test_encoder_split_builds_as_megatrons_layout(layout):
    """Stages before the encoder's last hold no LM layer; the rest split the LM by the usual rule
    (``first`` counting the encoder's last stage). megatron-core builds such stages only from a
    ``pipeline_model_parallel_layout``: ours, given to its TransformerConfig, gives back the same
    count and first layer on every stage."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_config import TransformerConfig

    n, pp, stages, first, last = layout
    lm_stages = pp - stages + 1
    try:
        if lm_stages == 1 and (first, last) != (None, None):
            raise ConfigError("the last stage holds every layer")
        lm = stage_layer_counts(n, lm_stages, first, last) if lm_stages > 1 else [n]
    except ConfigError:
        with pytest.raises(ConfigError, match="num_layers|pipeline"):
            stage_layer_counts(n, pp, first, last, vision_stages=stages)
        return
    counts = stage_layer_counts(n, pp, first, last, vision_stages=stages)
    assert counts == [0] * (stages - 1) + lm
    config = TransformerConfig(num_layers=n, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                               pipeline_dtype=torch.float32, pipeline_model_parallel_layout=megatron_layout(counts),
                               variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    built = config.pipeline_model_parallel_layout
    assert [built.get_num_layers_to_build(LayerType.decoder, pp_rank=r) for r in range(pp)] == counts
    assert [built.get_layer_offset(LayerType.decoder, pp_rank=r) for r in range(pp)] == stage_offsets(counts)


@pytest.mark.parametrize("split, pp, message", [
    ([32], 2, "a split over one stage is the default"),
    ([10, 10, 12], 2, "names 3 stages but parallel.pipeline_model_parallel_size=2"),
    ([32, 0], 2, "every stage it names needs at least one encoder block"),
    ([16, 15], 2, "adds up to 31 blocks but model.vision.num_layers=32"),
])
def test_encoder_split_refusals_name_the_field(split, pp, message):
    with pytest.raises(ConfigError, match=f"parallel.vision_blocks_per_pipeline_stage=.*{message}"):
        vision_stage_blocks(32, pp, split)


def test_encoder_split_contradictions():
    assert vision_stage_blocks(32, 3, None) == [32, 0, 0]
    assert vision_stage_blocks(32, 3, [20, 12]) == [20, 12, 0]
    with pytest.raises(ConfigError, match="num_layers_in_first_pipeline_stage=1: .* the last stage holds all 4"):
        stage_layer_counts(4, 2, 1, None, vision_stages=2)
    with pytest.raises(ConfigError, match="num_layers_in_last_pipeline_stage=2: .* the last stage holds all 4"):
        stage_layer_counts(4, 2, None, 2, vision_stages=2)
    assert stage_layer_counts(28, 3, None, 10, vision_stages=2) == [0, 18, 10]
    assert stage_layer_counts(28, 4, 2, None, vision_stages=2) == [0, 2, 13, 13]  # first: the encoder's last
    with pytest.raises(ConfigError, match=r"the LM is split over the last 3 of the 4 stages"):
        stage_layer_counts(28, 4, 3, None, vision_stages=2)


def test_encoder_split_in_the_config_and_its_description():
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig

    base = ["parallel.pipeline_model_parallel_size=3", "model.lm.num_layers=4", "model.vision.num_layers=3"]
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [*base, "parallel.vision_blocks_per_pipeline_stage=[2,1]"])
    assert cfg.parallel.stage_vision_blocks(3) == [2, 1, 0]
    assert cfg.parallel.stage_layer_counts(4) == [0, 2, 2]
    assert describe_split([0, 2, 2], [2, 1, 0]) == "3 stages: encoder blocks 0-1 | encoder blocks 2 + layers 0-1 | layers 2-3"
    assert describe_split([1, 3], [2, 0]) == "2 stages: layers 0 | 1-3"
    with pytest.raises(ConfigError, match=r"vision_blocks_per_pipeline_stage=\[2, 2\] adds up to 4 blocks"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*base, "parallel.vision_blocks_per_pipeline_stage=[2,2]"])


# --- the interleaved schedule (parallel.virtual_pipeline_model_parallel_size) ------------------
VIRTUAL_LAYOUTS = [(n, pp, vp) for n in (4, 6, 8, 12, 24) for pp in (2, 3, 4) for vp in (2, 3)]


@pytest.mark.parametrize("layout", VIRTUAL_LAYOUTS, ids=lambda l: "n{}-pp{}-vp{}".format(*l))
def test_virtual_split_equals_megatron(layout):
    """Virtual stage ``v * pp + r`` is chunk ``v`` of rank ``r``: the same layer count and first
    layer as megatron-core builds for (``vp_stage=v``, ``pp_rank=r``); a layout it refuses (or
    would build with an empty chunk) is refused here from the config alone."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n, pp, vp = layout
    try:
        config = TransformerConfig(num_layers=n, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vp, pipeline_dtype=torch.float32)
        built = [(get_num_layers_to_build(config, v, r), get_transformer_layer_offset(config, v, r))
                 for v in range(vp) for r in range(pp)]
        assert min(count for count, _ in built) >= 1
    except (ValueError, AssertionError):
        with pytest.raises(ConfigError, match="does not split evenly into"):
            virtual_stage_layer_counts(n, pp, vp)
        return
    counts = virtual_stage_layer_counts(n, pp, vp)
    assert list(zip(counts, stage_offsets(counts))) == built


def test_virtual_layouts_cover_both_outcomes():
    accepted = [l for l in VIRTUAL_LAYOUTS if l[0] % (l[1] * l[2]) == 0]
    assert 5 < len(accepted) < len(VIRTUAL_LAYOUTS) - 5


@pytest.mark.parametrize("args, message", [
    ((8, 2, 1), "=1: give 2 or more model chunks per rank"),
    ((8, 1, 2), "needs parallel.pipeline_model_parallel_size > 1"),
    ((8, 2, 2, 1, None), r"cut into 2 equal model chunks, and the stages of 1\+7 LM layers do not divide "
                         r"\(rank 0: 1; rank 1: 7 layers\)"),
    ((8, 2, 2, None, 3), r"stages of 5\+3 LM layers do not divide \(rank 0: 5; rank 1: 3 layers\)"),
    ((8, 2, 2, 8, None), "leaves 0 of model.lm.num_layers=8"),
    ((8, 2, 2, 4, 4), "give only parallel.num_layers_in_first_pipeline_stage=4"),
    ((8, 2, 2, None, None, 2), "vision_blocks_per_pipeline_stage with .* is not supported"),
    ((6, 2, 2), "num_layers=6 does not split evenly into 4 model chunks"),
])
def test_virtual_split_refusals_name_the_field(args, message):
    with pytest.raises(ConfigError, match=message):
        virtual_stage_layer_counts(*args)


UNEVEN_VIRTUAL = [(n, pp, vp, first, last) for n in (6, 8, 10, 12) for pp in (2, 3) for vp in (2, 3)
                  for first, last in ((2, None), (None, 2), (2, 4), (4, None), (3, 3), (1, None))]


@pytest.mark.parametrize("layout", UNEVEN_VIRTUAL, ids=lambda l: "n{}-pp{}-vp{}-first{}-last{}".format(*l))
def test_uneven_virtual_split_equals_megatron(layout):
    """Uneven first / last stages with model chunks: each rank's layers cut into equal chunks, the
    same count and first layer per (chunk, rank) as megatron-core builds; a layout it refuses (or
    would build with an empty or uneven chunk) is refused here from the config alone."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n, pp, vp, first, last = layout
    try:
        config = TransformerConfig(num_layers=n, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vp, pipeline_dtype=torch.float32,
                                   num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
        built = [(get_num_layers_to_build(config, v, r), get_transformer_layer_offset(config, v, r))
                 for v in range(vp) for r in range(pp)]
        assert min(count for count, _ in built) >= 1
        assert sum(count for count, _ in built) == n  # megatron builds every layer exactly once
        megatron_ok = True
    except (ValueError, AssertionError, ZeroDivisionError):  # pp=2 with both ends: megatron divides by 0
        megatron_ok = False
    try:
        counts = virtual_stage_layer_counts(n, pp, vp, first, last)
    except ConfigError:
        assert not megatron_ok, f"refused here, built by megatron: {built}"
        return
    assert megatron_ok, counts
    assert list(zip(counts, stage_offsets(counts))) == built


def test_uneven_virtual_layouts_cover_both_outcomes():
    def ok(layout):
        try:
            virtual_stage_layer_counts(*layout)
            return True
        except ConfigError:
            return False

    accepted = [l for l in UNEVEN_VIRTUAL if ok(l)]
    assert 10 < len(accepted) < len(UNEVEN_VIRTUAL) - 10
    assert virtual_stage_layer_counts(6, 2, 2, 2, None) == [1, 2, 1, 2]
    assert describe_virtual_split([1, 2, 1, 2], 2) == "2 ranks x 2 chunks: rank 0 layers 0, 3 | rank 1 layers 1-2, 4-5"


def test_virtual_split_described_per_rank():
    assert describe_virtual_split([1, 1, 1, 1], 2) == "2 ranks x 2 chunks: rank 0 layers 0, 2 | rank 1 layers 1, 3"
    assert describe_virtual_split([2] * 6, 3) == ("3 ranks x 2 chunks: rank 0 layers 0-1, 6-7 | rank 1 layers 2-3, 8-9 | "
                                                  "rank 2 layers 4-5, 10-11")


def test_virtual_split_in_the_config_and_the_batch_schedule():
    """The config refuses an impossible interleaved layout, naming the field; the batch schedule
    refuses a step (or a ramp-up stage) whose micro-batches are not a multiple of PP, before any model."""
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.batch_schedule import BatchSchedule

    base = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]
    with pytest.raises(ConfigError, match="num_layers=2 does not split evenly into 4 model chunks"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", base)
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size=0"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["parallel.virtual_pipeline_model_parallel_size=0"])
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*base, "model.lm.num_layers=4"])
    assert cfg.parallel.model_chunks == 2 and cfg.parallel.virtual_stage_layer_counts(4) == [1, 1, 1, 1]
    uneven = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*base, "model.lm.num_layers=6",
                                                                          "parallel.num_layers_in_first_pipeline_stage=2"])
    assert uneven.parallel.virtual_stage_layer_counts(6) == [1, 2, 1, 2]
    with pytest.raises(ConfigError, match="num_layers=6 does not split evenly into 4 model chunks.*for an uneven split"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [*base, "model.lm.num_layers=6"])
    assert BatchSchedule(cfg, dp_size=1).at(0) == (8, 4)
    with pytest.raises(ConfigError, match="global batch of 6 is 3 micro-batches .* not a multiple of "
                                          "parallel.pipeline_model_parallel_size=2"):
        BatchSchedule(load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                                  [*base, "model.lm.num_layers=4", "global_batch_size=6"]), dp_size=1)
    with pytest.raises(ConfigError, match=r"global batch of 2 is 1 micro-batches .*\(rampup_batch_size included\)"):
        BatchSchedule(load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                                  [*base, "model.lm.num_layers=4", "rampup_batch_size=[2,2,8]"]), dp_size=1)

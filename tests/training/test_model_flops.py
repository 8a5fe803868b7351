"""The analytic FLOP count of a micro-batch (casa_megatron/training/flops.py) equals, to the FLOP,
torch's FlopCounterMode on a real forward + backward of the model (``benchmarks.flops
.count_gemm_flops``: every mm / addmm / bmm / baddbmm), for every fusion, placement, encoder and
freezing variant; its attention term is the pair count of ``attention_pairs``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from support.dist import run_distributed
from support.vlm import IMAGE_SLOTS, QWEN_VISION, random_batch, small_model_config, without_images

from casa_megatron.config import LoRAConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# name -> (fusion kwargs, vision kwargs, model overrides, batch: "images" | "video" | "none")
CASES = {
    "casa_parallel": ({}, None, {}, "images"),
    "casa_before": ({"placement": "before"}, None, {}, "images"),
    "casa_replace": ({"placement": "replace", "every_n": 2}, None, {}, "images"),
    "casa_shared": ({"share_projections": True}, None, {}, "images"),
    "casa_fused_image_qkv_raw_images": ({"image_kv_only": False, "normalize_images": False}, None, {}, "images"),
    "cross_attention_gated": ({"mechanism": "cross_attention", "cross_attention_gate": True, "every_n": 2},
                              None, {}, "images"),
    "insertion": ({"mechanism": "insertion"}, None, {}, "images"),
    "qwen_video": ({}, QWEN_VISION, {}, "video"),
    "qwen_insertion_video": ({"mechanism": "insertion"}, QWEN_VISION, {}, "video"),
    "freeze_lm": ({"layers": [1, 3]}, None, {"freeze_lm": True}, "images"),
    # trainable rows of a frozen LM's vocabulary: gradients reach the embedding through every
    # layer, and the output layer computes its weight gradient (model/token_rows.py)
    "freeze_lm_trainable_tokens": ({"layers": [1, 3]}, None, {"freeze_lm": True, "trainable_tokens": [3, 5]}, "images"),
    "freeze_lm_shared": ({"share_projections": True, "layers": [2]}, None, {"freeze_lm": True}, "images"),
    "freeze_lm_replace": ({"placement": "replace", "layers": [1]}, None, {"freeze_lm": True}, "images"),
    "freeze_lm_before_raw_images": ({"placement": "before", "layers": [1], "normalize_images": False}, None,
                                    {"freeze_lm": True}, "images"),
    "vision_last_block": ({}, {"trainable_blocks": 1}, {}, "images"),
    "vision_frozen_projector_frozen": ({}, {"trainable_blocks": 0, "projector_trainable": False}, {}, "images"),
    "qwen_last_block_frozen_lm": ({}, {**QWEN_VISION, "trainable_blocks": 1}, {"freeze_lm": True}, "video"),
    "lora_all_linears": ({"layers": [1, 3]}, None, {"freeze_lm": True, "lora": LoRAConfig(rank=4)}, "images"),
    "lora_replace_mlp_some_layers": ({"placement": "replace", "every_n": 2}, None,
                                     {"freeze_lm": True, "lora": LoRAConfig(rank=3, layers=[0, 1], dropout=0.1)},
                                     "images"),
    "lora_insertion_attention": ({"mechanism": "insertion"}, None,
                                 {"freeze_lm": True, "lora": LoRAConfig(rank=2, targets=["linear_qkv", "linear_proj"])},
                                 "images"),
    "vision_lora_frozen_encoder": ({}, {"trainable_blocks": 0, "lora": LoRAConfig(rank=4)}, {}, "images"),
    "qwen_vision_lora_block0_frozen_lm": ({}, {**QWEN_VISION, "trainable_blocks": 1,
                                              "lora": LoRAConfig(rank=2, layers=[0], targets=["linear_qkv", "linear_fc2"])},
                                          {"freeze_lm": True}, "video"),
    "dora_some_layers_with_vision_dora": ({"layers": [1, 3]}, {"trainable_blocks": 0, "lora": LoRAConfig(rank=2, dora=True)},
                                          {"freeze_lm": True, "lora": LoRAConfig(rank=4, layers=[0, 3], dora=True)},
                                          "images"),
    "no_images": ({}, None, {}, "none"),
    "insertion_no_images": ({"mechanism": "insertion"}, None, {}, "none"),
}


def _batch(kind: str):
    if kind == "video":
        return random_batch(3, temporal=2)
    batch = random_batch(3)
    return without_images(batch) if kind == "none" else batch


def _count_all(rank, world):
    from benchmarks.flops import count_gemm_flops
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.flops import microbatch_flops

    initialize_parallel(1, 1, seed=0)
    out = {}
    for name, (fusion, vision, overrides, kind) in CASES.items():
        cfg = dataclasses.replace(small_model_config(vision, **fusion), **overrides)
        model = build_vlm(cfg, ParallelConfig(), image_seq_length=IMAGE_SLOTS)
        batch = _batch(kind)
        counted = count_gemm_flops(lambda: (model(batch) * batch.loss_mask).sum().backward())
        forward = count_gemm_flops(lambda: model(batch))
        analytic = microbatch_flops(cfg, batch, IMAGE_SLOTS)
        out[name] = (counted, analytic.gemm, analytic.attention, analytic.parts, forward, analytic)
    return out


def test_analytic_gemm_flops_equal_torchs_counter_on_a_real_step():
    results, = run_distributed(_count_all, world_size=1)
    wrong = {name: (counted, analytic) for name, (counted, analytic, *_) in results.items() if counted != analytic}
    assert not wrong, f"analytic != FlopCounterMode for {wrong}"
    # the forward part alone (what a pipeline stage runs in its forward slot): a forward-only run
    wrong = {name: (r[4], r[5].forward_gemm) for name, r in results.items() if r[4] != r[5].forward_gemm}
    assert not wrong, f"analytic forward != FlopCounterMode on a forward for {wrong}"
    for name, r in results.items():
        mb = r[5]
        assert mb.forward_gemm <= mb.forward < mb.total, name
    # a frozen encoder whose input needs no gradient runs forward only: all of its cost is forward
    frozen = results["vision_frozen_projector_frozen"][5]
    assert list(frozen.forward_encoder[1:-1]) == [g + a for g, a in frozen.vision_blocks]
    trained = results["casa_parallel"][5]
    assert all(3 * f == g + a for f, (g, a) in zip(trained.forward_encoder[1:-1], trained.vision_blocks))
    # the variants differ where they should: a frozen LM skips weight gradients
    assert results["freeze_lm"][0] < results["casa_parallel"][0]
    assert results["freeze_lm"][0] < results["freeze_lm_trainable_tokens"][0] < results["casa_parallel"][0]
    assert results["vision_last_block"][0] < results["casa_parallel"][0]
    # LoRA adds its GEMMs (and their weight gradients) to the frozen LM's
    assert results["freeze_lm"][1] < results["lora_all_linears"][1]
    assert results["lora_all_linears"][3]["lm.mlp.fc1.lora_a"] > 0
    # the K/V-only image projection saves the image-query GEMM
    assert results["casa_fused_image_qkv_raw_images"][0] > results["casa_parallel"][0]


def test_attention_term_is_the_visible_pairs_of_lm_and_vision():
    """Everything trains: 3 passes over attention_pairs (LM) plus the vision segments (per image)."""
    from benchmarks.flops import attention_pairs
    from casa_megatron.training.flops import ATTENTION_FLOPS_PER_PAIR, attention_flops, microbatch_flops

    cfg = small_model_config()
    batch = random_batch(3)
    pairs = attention_pairs(cfg, batch, IMAGE_SLOTS)
    grid = batch.image_grid_hw.long()
    vision_pairs = cfg.vision.num_layers * int(((grid[:, 0] * grid[:, 1]) ** 2).sum())  # one segment per image
    expected = attention_flops(cfg, pairs["self_attention"] + pairs["fusion"]) \
        + 3 * ATTENTION_FLOPS_PER_PAIR * cfg.vision.hidden_size * vision_pairs
    assert microbatch_flops(cfg, batch, IMAGE_SLOTS).attention == expected


def test_vision_pairs_are_the_segments_the_encoder_attends_in():
    """Qwen2.5-VL: frames in full-attention blocks, the geometry's windows (edge windows smaller)
    in the others; a micro-batch without images runs one blank merge group."""
    from casa_megatron.model.vision.geometry import frame_segments, window_partition
    from casa_megatron.training.flops import vision_block_pairs, vision_grid

    cfg = small_model_config({**QWEN_VISION, "window_size": 56, "num_layers": 3, "fullatt_block_indexes": [1]})
    grid = [[1, 6, 10], [2, 4, 4], [1, 2, 2]]  # 3 x 5 merge units: windows of 2 x 2, 2 x 1, 1 x 2, 1 x 1
    thw = torch.tensor(grid)

    def squared(cu):
        return int(((cu[1:] - cu[:-1]).long() ** 2).sum())

    windowed, full = squared(window_partition(thw, 2, 2)[1]), squared(frame_segments(thw))
    assert windowed < full
    assert vision_block_pairs(cfg, grid) == [windowed, full, windowed]
    assert vision_grid(cfg, []) == [[1, 2, 2]] and vision_grid(cfg, grid) == grid


def test_pairs_equal_the_windows_and_segments_the_model_builds():
    """layer_pairs reads the batch's index tensors directly; the model's own window layout
    (model/windows.py) and insertion layout are the reference, with explicit window starts
    (QA turns), without sample_starts, and without images."""
    from casa_megatron.model.batch import window_start_marks
    from casa_megatron.model.insertion import build_insertion_layout
    from casa_megatron.model.packed_attention import packed_seq_params, params_from_sample_starts, segment_starts
    from casa_megatron.model.vision import tokens_per_image
    from casa_megatron.model.windows import build_windows
    from casa_megatron.training.flops import bottom_right_pairs, causal_pairs, layer_pairs

    base = random_batch(4)
    turns = base.sample_starts.clone()
    turns[0, [0, 9, 12]] = turns[1, [0, 5, 8, 11, 14]] = True  # every image on a start, plus text-only turns
    batches = [base, dataclasses.replace(base, window_starts=turns),
               dataclasses.replace(base, sample_starts=None), without_images(base)]
    for batch in batches:
        b, s = batch.shape
        counts = tokens_per_image(batch.image_grid_thw)
        cu = params_from_sample_starts(batch.sample_starts, b, s, "cpu").cu_seqlens_q
        windows = build_windows(b, s, batch.image_rows, batch.image_positions, counts,
                                window_starts=window_start_marks(batch))
        nq = windows.cu_seqlens_q[1:] - windows.cu_seqlens_q[:-1]
        n_img = windows.cu_seqlens_image[1:] - windows.cu_seqlens_image[:-1]
        sa = causal_pairs(cu[1:] - cu[:-1])
        assert layer_pairs(small_model_config(), batch, IMAGE_SLOTS) == (sa, bottom_right_pairs(nq, nq + n_img))
        cross = small_model_config(mechanism="cross_attention")
        assert layer_pairs(cross, batch, IMAGE_SLOTS) == (sa, int((nq * n_img).sum()))
        layout = build_insertion_layout(b, s, IMAGE_SLOTS, batch.image_rows, batch.image_positions, counts,
                                        batch.position_ids, batch.sample_starts)
        cu = packed_seq_params(segment_starts(layout.segment_ids)).cu_seqlens_q
        assert layer_pairs(small_model_config(mechanism="insertion"), batch, IMAGE_SLOTS) == \
            (causal_pairs(cu[1:] - cu[:-1]), 0)


# (fusion kwargs, LM layers on the first and last stage, encoder blocks per stage or None)
STAGE_CASES = {
    "casa_even": ({"every_n": 2}, (None, None), None),
    "casa_first_1": ({}, (1, None), None),
    "insertion_last_1": ({"mechanism": "insertion"}, (None, 1), None),
    # the encoder over both stages: patch embedding + block 0 | block 1, projector, every LM layer
    "casa_encoder_split": ({}, (None, None), [1, 1]),
    "insertion_encoder_split": ({"mechanism": "insertion"}, (None, None), [1, 1]),
}


def _count_stages(rank, world):
    from megatron.core import parallel_state
    from support.equivalence import build, run_schedule

    from benchmarks.flops import count_gemm_flops
    from casa_megatron.config import ParallelConfig
    from casa_megatron.training.flops import microbatch_flops

    batch = random_batch(3)
    out = {}
    for name, (fusion, split, vision_split) in STAGE_CASES.items():
        model = build(pp=2, split=split, vision_split=vision_split, **fusion)
        counted = count_gemm_flops(lambda: run_schedule(model, [batch]))
        parallel = ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=split[0],
                                  num_layers_in_last_pipeline_stage=split[1],
                                  vision_blocks_per_pipeline_stage=vision_split)
        counts = parallel.stage_layer_counts(4)
        analytic = microbatch_flops(small_model_config(None, **fusion), batch, IMAGE_SLOTS)
        stages = analytic.stages(counts, parallel.stage_vision_blocks(2))
        assert sum(g for g, _ in stages) == analytic.gemm and sum(a for _, a in stages) == analytic.attention
        out[name] = (counted, stages[parallel_state.get_pipeline_model_parallel_rank()][0], counts)
    return out


def test_stage_flops_equal_torchs_counter_on_each_pipeline_stage():
    """``MicroBatchFlops.stages`` (what benchmarks/pipeline_balance.py plans with): on each stage of
    a real PP=2 step, even and uneven splits and the encoder over both stages, the GEMM FLOPs torch
    counts on that rank."""
    first, second = run_distributed(_count_stages, world_size=2)
    # the encoder split moved work: stage 0 holds no LM layer, stage 1 more than without the split
    assert first["casa_encoder_split"][2] == [0, 4] and second["casa_encoder_split"][1] > second["casa_even"][1]
    for stage in (first, second):
        wrong = {name: (counted, analytic) for name, (counted, analytic, _) in stage.items() if counted != analytic}
        assert not wrong, f"stage analytic != FlopCounterMode for {wrong}"

"""Data-parallel communication overlapped with compute (``parallel.overlap_grad_reduce``,
``parallel.overlap_param_gather``, ``parallel.ddp_bucket_size``; Megatron-LM's flags of the same
names): the same numbers as the synchronous path, with several buckets, micro-batches without
images, checkpoints and resume, in two gloo processes (DP=2, distributed optimizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.dist import run_distributed

OVERLAP = dict(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=3000)  # several buckets


# Which micro-batches of each step have no image. megatron learns from the first step which parameters
# produce a gradient in the last micro-batch, and launches a bucket's reduction once all of them have
# one again; it waits for a bucket's all-gather in the forward hooks of the modules that use it. Step 2
# ends on a text-only micro-batch, step 3 starts with one, step 4 has no image at all: each breaks
# one of the two unless every micro-batch runs the same modules.
TEXT_ONLY = [(), (1,), (0,), (0, 1)]


def _steps(rank, world, parallel, vision, bf16=False, fusion=None, recompute=False, lora=0, global_names=False):
    """Four optimizer steps of a small VLM on two micro-batches per DP rank: losses, grad norms,
    the final parameters, the number of buckets, megatron's warnings about the gather order.
    ``global_names``: parameters keyed by the one-process model's names (layouts that place
    layers differently compare by them)."""
    import warnings

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from support.vlm import QWEN_VISION, SEQ, random_batch, small_model_config, without_images

    from support.equivalence import stage_global_names

    from casa_megatron.config.schema import ParallelConfig, TrainConfig
    from casa_megatron.model.build import build_model_chunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.optimizer import build_optimizer, finish_param_gather, wrap_ddp
    from casa_megatron.training.step import data_for_chunks, forward_step

    cfg = TrainConfig(model=small_model_config(QWEN_VISION if vision == "qwen" else None, **(fusion or {})),
                      parallel=ParallelConfig(**parallel), train_steps=4, micro_batch_size=2, global_batch_size=8)
    cfg.optimizer.warmup_steps = 1
    cfg.precision.bf16 = bf16
    if lora:  # adapters on the frozen LM, attached after the model is built
        cfg.model.freeze_lm, cfg.model.lora.rank = True, lora
    if recompute:  # backward re-runs the forward: megatron's forward pre-hooks fire again
        from casa_megatron.config.schema import RecomputeConfig

        cfg.model.recompute = RecomputeConfig(granularity="full", method="uniform", num_layers=1)
        cfg.model.vision.recompute = RecomputeConfig(granularity="full", method="uniform", num_layers=1)
    cfg.parallel.validate(cfg.model)
    initialize_parallel(1, cfg.parallel.pipeline_model_parallel_size, seed=0,
                        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size)
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()  # both pipeline stages of a replica read its data
    image_slots = 16  # the pipeline tensor is [SEQ + image_slots, b, h] between stages
    chunks = build_model_chunks(cfg.model, cfg.parallel, image_seq_length=image_slots,
                                params_dtype=torch.bfloat16 if bf16 else torch.float32, precision=cfg.precision)
    ddp = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(ddp, cfg)
    temporal = 2 if vision == "qwen" else 1
    losses, norms = [], []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step, text_only in enumerate(TEXT_ONLY):
            batches = [random_batch(100 * step + 10 * dp_rank + m, temporal=temporal) for m in range(2)]
            batches = [without_images(b) if m in text_only else b for m, b in enumerate(batches)]
            for chunk in ddp:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(forward_step_func=forward_step,
                                              data_iterator=data_for_chunks(iter(batches), len(ddp)),
                                              model=ddp.chunks, num_microbatches=2, seq_length=SEQ + image_slots,
                                              micro_batch_size=2)
            _, norm, _ = optimizer.step()
            scheduler.step(increment=1)
            if out:  # the last pipeline stage
                losses.append(float(torch.stack([o["loss"] for o in out]).mean()))
            norms.append(float(norm))
    finish_param_gather(ddp)  # the last step's update, as a checkpoint sees it
    buckets = sum(len(group.buckets) for chunk in ddp for group in chunk.bucket_groups)
    order = sorted({str(w.message)[:80] for w in record if "all-gather" in str(w.message)})
    params = {}
    for chunk in chunks:
        names = stage_global_names(chunk) if global_names else {}
        params.update({names.get(n, n): p.detach().float().clone() for n, p in chunk.named_parameters()})
    return losses, norms, params, buckets, order


@pytest.mark.parametrize("vision, fusion, recompute, lora", [
    ("tiny_vit", {}, False, 0), ("qwen", {}, False, 0), ("tiny_vit", {"mechanism": "insertion"}, False, 0),
    ("tiny_vit", {"mechanism": "cross_attention", "cross_attention_gate": True}, False, 0),
    ("tiny_vit", {"placement": "before", "share_projections": True}, False, 0), ("qwen", {}, True, 0),
    ("tiny_vit", {}, False, 4),
], ids=["casa", "casa_qwen", "insertion", "gated_cross_attention", "casa_before_shared", "casa_qwen_recompute",
        "casa_lora"])
def test_overlapped_steps_equal_synchronous_ones_with_text_only_micro_batches(vision, fusion, recompute, lora):
    """Modules run in the order their parameters are registered, so megatron prefetches each
    bucket's all-gather before it is needed (it warns when a bucket was needed out of order).
    Equal up to rounding: without overlap megatron keeps one bucket (bucket_size applies to
    overlapped reduction only), so the optimizer's shards and the order in which the gradient
    norm is summed differ, and with it the clipping factor in its last bits. A missed or stale
    update would show at the scale of one Adam step (lr 1e-5 .. 1e-4), 10-100x the tolerance."""
    plain = run_distributed(_steps, world_size=2, parallel={}, vision=vision, fusion=fusion, recompute=recompute,
                            lora=lora)
    overlap = run_distributed(_steps, world_size=2, parallel=OVERLAP, vision=vision, fusion=fusion,
                              recompute=recompute, lora=lora)
    assert overlap[0][4] == [], overlap[0][4]
    for rank in range(2):
        assert overlap[rank][0] == pytest.approx(plain[rank][0], rel=1e-6)  # losses
        assert overlap[rank][1] == pytest.approx(plain[rank][1], rel=1e-6)  # grad norms
        for name, value in plain[rank][2].items():
            np.testing.assert_allclose(overlap[rank][2][name], value, rtol=0, atol=1e-6, err_msg=name)
    assert overlap[0][3] >= 10 and plain[0][3] <= 2  # several buckets (one, plus the output layer's, without)
    for name, value in overlap[0][2].items():  # both ranks hold the same, current weights
        np.testing.assert_array_equal(overlap[1][2][name], value, err_msg=name)


def test_overlap_with_the_encoder_over_two_pipeline_stages():
    """4 ranks: PP=2 with the encoder split over both stages (blocks 1 + 1) x DP=2, overlapped vs
    synchronous, with the text-only micro-batches above: each encoder stage runs the blank image
    (the buckets of stage 1's encoder block and projector must fill in every micro-batch too).
    The same losses, gradient norms and weights; the two replicas of each stage hold the same."""
    pp = dict(pipeline_model_parallel_size=2, vision_blocks_per_pipeline_stage=[1, 1])
    plain = run_distributed(_steps, world_size=4, parallel=pp, vision="qwen")
    overlap = run_distributed(_steps, world_size=4, parallel={**pp, **OVERLAP}, vision="qwen")
    # megatron's rank order: TP, then DP, then PP: ranks 0, 1 hold stage 0, ranks 2, 3 stage 1
    assert [len(r[0]) for r in overlap] == [0, 0, 4, 4]  # losses on the last stage
    # stage 0: patch embedding and block 0; stage 1: block 1 (local name blocks.0) and the projector
    assert "vision.patch_embed.weight" in overlap[0][2] and "vision.patch_embed.weight" not in overlap[2][2]
    assert any(n.startswith("vision.blocks.0.") for n in overlap[2][2])
    assert any(n.startswith("projector.") for n in overlap[2][2])
    assert not any(n.startswith(("projector.", "decoder.layers.")) for n in overlap[0][2])
    for rank in range(4):
        assert overlap[rank][4] == [], overlap[rank][4]
        assert overlap[rank][0] == pytest.approx(plain[rank][0], rel=1e-6)
        assert overlap[rank][1] == pytest.approx(plain[rank][1], rel=1e-6)
        for name, value in plain[rank][2].items():
            np.testing.assert_allclose(overlap[rank][2][name], value, rtol=0, atol=1e-6, err_msg=name)
    for first, second in ((0, 1), (2, 3)):  # the replicas of a stage
        for name, value in overlap[first][2].items():
            np.testing.assert_array_equal(overlap[second][2][name], value, err_msg=name)


def test_interleaved_pipeline_with_overlapped_data_parallelism():
    """4 ranks: PP=2 with two model chunks per rank (``parallel.virtual_pipeline_model_parallel_size=2``;
    each chunk its own DDP, the second one bucket) x DP=2, gradient reduction and parameter
    gathering overlapped, against 1F1B at PP=2 x DP=2 without overlap, with the text-only
    micro-batches above: the same losses, gradient norms and weights (compared by global name:
    rank 0 holds LM layers 0 and 2 here, 0 and 1 there); both replicas hold the same."""
    plain = run_distributed(_steps, world_size=4, parallel=dict(pipeline_model_parallel_size=2), vision="qwen",
                            global_names=True)
    interleaved = run_distributed(_steps, world_size=4, parallel=dict(pipeline_model_parallel_size=2,
                                                                      virtual_pipeline_model_parallel_size=2, **OVERLAP),
                                  vision="qwen", global_names=True)
    assert [len(r[0]) for r in interleaved] == [0, 0, 4, 4]  # losses on the last stage
    assert any(n.startswith("decoder.layers.2.") for n in interleaved[0][2])
    assert not any(n.startswith("decoder.layers.2.") for n in plain[0][2])
    assert interleaved[0][3] > 2  # chunk 0 in several buckets, chunk 1 in one
    for rank in range(4):
        assert interleaved[rank][4] == [], interleaved[rank][4]
        assert interleaved[rank][0] == pytest.approx(plain[rank][0], rel=1e-5)
        assert interleaved[rank][1] == pytest.approx(plain[rank][1], rel=1e-5)
    for replica in ((0, 2), (1, 3)):  # megatron's rank order: TP, DP, PP
        weights = [{**run[replica[0]][2], **run[replica[1]][2]} for run in (plain, interleaved)]
        assert weights[0].keys() == weights[1].keys()
        for name, value in weights[0].items():
            np.testing.assert_allclose(weights[1][name], value, rtol=0, atol=1e-5, err_msg=name)
    for name, value in interleaved[0][2].items():  # the replicas of rank 0's chunks
        np.testing.assert_array_equal(interleaved[1][2][name], value, err_msg=name)


def test_encoder_split_in_bf16_follows_one_process():
    """bf16 (as on a GPU) through the encoder split at PP=2 (blocks 1 + 1; bf16 text embeddings and
    encoder activations in one pipeline tensor, the blank image of the text-only micro-batches):
    four optimizer steps follow one process's bf16 steps on the same batches (DP=1 in both)."""
    one = run_distributed(_steps, world_size=1, parallel={}, vision="qwen", bf16=True)
    split = run_distributed(_steps, world_size=2, parallel=dict(pipeline_model_parallel_size=2,
                                                                vision_blocks_per_pipeline_stage=[1, 1]),
                            vision="qwen", bf16=True)
    assert split[0][0] == [] and len(split[1][0]) == 4  # losses on the last stage
    # the same bf16 operations in the same order: equal far below bf16's own rounding (bf16 vs fp32
    # runs of these steps differ by 5e-4 in the projector's weights)
    assert split[1][0] == pytest.approx(one[0][0], rel=1e-5)
    assert split[1][1] == pytest.approx(one[0][1], rel=1e-5)  # grad norms (every stage's)
    for name, value in split[1][2].items():  # stage 1: encoder block 1 (local blocks.0), projector, LM
        reference = one[0][2][name.replace("vision.blocks.0.", "vision.blocks.1.")]
        np.testing.assert_allclose(value, reference, rtol=0, atol=1e-5, err_msg=name)
    assert any(n.startswith("projector.") for n in split[1][2])


def test_overlapped_bf16_steps_keep_every_rank_current():
    """bf16 (as on a GPU): the distributed optimizer keeps fp32 master weights and gathers bf16
    copies. The step's numbers follow the synchronous run's to bf16 rounding, and after the
    gather both ranks hold the same weights (a bucket left un-gathered would differ there)."""
    plain = run_distributed(_steps, world_size=2, parallel={}, vision="tiny_vit", bf16=True)
    overlap = run_distributed(_steps, world_size=2, parallel=OVERLAP, vision="tiny_vit", bf16=True)
    assert overlap[0][3] >= 10
    for rank in range(2):
        assert overlap[rank][0] == pytest.approx(plain[rank][0], rel=1e-3)
        assert overlap[rank][1] == pytest.approx(plain[rank][1], rel=1e-2)
    for name, value in overlap[0][2].items():
        np.testing.assert_array_equal(overlap[1][2][name], value, err_msg=name)
        np.testing.assert_allclose(value, plain[0][2][name], rtol=0, atol=2e-2, err_msg=name)


def _train(rank, world, run_dir, overrides, steps):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "optimizer.warmup_steps=2",
                       "optimizer.wsd_decay_steps=0", "checkpoint.save_interval=5", "tracking.enabled=false",
                       *overrides])
    train(cfg)


def _checkpoint_tensors(path):
    from casa_megatron.training.checkpoint import read_tensors

    return read_tensors(path)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_overlapped_training_saves_current_weights_and_resumes_to_the_same_losses(tmp_path):
    """Through the training loop at DP=2: the overlapped run follows the synchronous curve; its
    checkpoint holds the weights of the step it names (not the previous step's, which is what
    each rank holds outside its own shard until the next forward) and, per parameter, the same
    optimizer state as the one-bucket run's (megatron-core 0.16.1 shifts it when there are several
    buckets: compat/optimizer_checkpoint.py); resuming from it gives the uninterrupted run's losses."""
    import shutil

    plain, overlap, resumed = tmp_path / "plain", tmp_path / "overlap", tmp_path / "resumed"
    flags = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
             f"parallel.ddp_bucket_size={OVERLAP['ddp_bucket_size']}"]
    run_distributed(_train, world_size=2, run_dir=str(plain), overrides=[], steps=8)
    run_distributed(_train, world_size=2, run_dir=str(overlap), overrides=flags, steps=8)
    for ref, got in zip(_rows(plain), _rows(overlap), strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)

    saved = {step: (_checkpoint_tensors(plain / f"checkpoints/iter_{step:07d}"),
                    _checkpoint_tensors(overlap / f"checkpoints/iter_{step:07d}")) for step in (5, 8)}
    for step, (ref, got) in saved.items():
        assert ref.keys() == got.keys()
        weights = [n for n in ref if not n.startswith("optimizer.")]
        moments = [n for n in ref if n.startswith("optimizer.state.exp_avg")]
        assert len(weights) > 40 and len(moments) == 2 * len(weights)
        for name in weights:
            np.testing.assert_allclose(got[name].numpy(), ref[name].numpy(), rtol=0, atol=1e-5,
                                       err_msg=f"step {step}: {name}")
        for name in moments:  # rounding of the clipping factor only (see above)
            np.testing.assert_allclose(got[name].numpy(), ref[name].numpy(), rtol=1e-3, atol=1e-9,
                                       err_msg=f"step {step}: {name}")
    moved = max(float((saved[8][0][n] - saved[5][0][n]).abs().max()) for n in saved[5][0]
                if not n.startswith("optimizer."))
    assert moved > 1e-3  # three steps move the weights far beyond the tolerance: a stale copy would show

    shutil.copytree(overlap, resumed)
    shutil.rmtree(resumed / "checkpoints/iter_0000008")
    (resumed / "checkpoints/latest").write_text("iter_0000005")
    run_distributed(_train, world_size=2, run_dir=str(resumed), overrides=flags, steps=8)
    for ref, got in zip(_rows(overlap), _rows(resumed), strict=True):
        assert got["step"] == ref["step"] and got["loss"] == pytest.approx(ref["loss"], rel=1e-6), got["step"]


@pytest.mark.parametrize("layout", [
    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    ["parallel.pipeline_model_parallel_size=2", "model.lm.tie_word_embeddings=true"],
    ["model.freeze_lm=true"],
    ["optimizer.use_distributed_optimizer=false"],
], ids=["tp2_sp", "pp2_tied", "dp2_frozen_lm", "dp2_plain_adam"])
def test_overlap_flags_follow_the_synchronous_curve_in_other_layouts(tmp_path, layout):
    """The recipes turn overlap on; a run on fewer GPUs (TP=2 or PP=2 with one data-parallel
    replica), with the LM frozen (CASA and projector in the buckets) or with every rank keeping
    the whole optimizer state (all-reduce; no parameters to gather) gives the same losses and
    gradient norms with it as without."""
    flags = ["parallel.overlap_grad_reduce=true", f"parallel.ddp_bucket_size={OVERLAP['ddp_bucket_size']}"]
    if "optimizer.use_distributed_optimizer=false" not in layout:
        flags.append("parallel.overlap_param_gather=true")
    curves = []
    for name, extra in (("plain", []), ("overlap", flags)):
        run_distributed(_train, world_size=2, run_dir=str(tmp_path / name), overrides=layout + extra, steps=6)
        curves.append(_rows(tmp_path / name))
    for ref, got in zip(*curves, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), got["step"]

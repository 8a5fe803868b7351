"""Hugging Face folders made the way a user makes them: a model trained at TP=2 or PP=2 saves a
real training checkpoint (``Checkpointer.save``: model + distributed-optimizer state +
``config.yaml`` + manifest), then ``casa-convert export-hf`` (``conversion.cli.main``) writes
the folder from it.

``export_variants`` does this for every fusion variant in two forked gloo processes (the
weights start from a perturbed full state so norms, CASA copies and gates are non-trivial, then
take one AdamW step through megatron's schedule) and returns the megatron logits of the trained
model on the image+text and video+text cases (``hf_cases``), per layout; the exports run in one
more forked process (one process, TP=1, as the CLI does). Used by the ``exported`` fixtures of
tests/hf and tests/inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Sequence

import torch
from support.dist import run_distributed
from support.hf_cases import IMAGE_SLOTS, VARIANTS, make_case, megatron_batch
from support.hf_equivalence import stage_logits

# layout: (TP, PP, encoder blocks per stage or None); the last, the encoder over both stages
# (parallel.vision_blocks_per_pipeline_stage), for the variants ENCODER_SPLIT_VARIANTS only
LAYOUTS = {"tp2": (2, 1, None), "pp2": (1, 2, None), "pp2_encoder_split": (1, 2, [1, 1])}
ENCODER_SPLIT_VARIANTS = ("casa_parallel", "insertion", "casa_lora")
PRIMARY = "tp2"  # the folder of each variant that other tests load (root / variant)
# Beyond the fusion variants: LM changes exported the same way. Tied embeddings (under PP=2 the
# last stage holds a copy of the embedding that megatron checkpoints under the embedding's key);
# the Helium family (the export permutes Q/K rows back to interleaved pairs, the remote code
# rotates pairs, in self-attention and CASA alike); Llama-3 RoPE scaling (rope_parameters); LoRA
# adapters on the frozen LM (the export merges them into the weights), trained at TP=2 / PP=2.
LLAMA3 = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
# rsLoRA on the LM (alpha / sqrt(rank)), plain LoRA on the frozen encoder's blocks
LORA_ALL = dict(rank=4, alpha=8.0, rslora=True, vision=dict(rank=2, alpha=4.0))
LORA_MLP = dict(rank=3, alpha=6.0, targets=["linear_fc1", "linear_fc2"], layers=[1, 2])
LM_VARIANTS = {"casa_tied_embeddings": ({}, {"tie_word_embeddings": True}),
               "casa_helium_family": ({}, {"family": "helium"}),
               "cross_attention_llama3_rope": (dict(mechanism="cross_attention", cross_attention_gate=True),
                                               {"family": "llama", "rope_scaling": LLAMA3}),
               "casa_lora": ({}, {}, LORA_ALL),
               # Qwen3's per-head q/k norms, CASA sharing self-attention's projections and norms
               "casa_qwen3_shared_qk_norms": (dict(share_projections=True, layers=[1, 3]),
                                              {"family": "qwen3", "qk_layernorm": True}),
               # DoRA; Helium's Q/K rows are permuted on export: B's rows and the magnitudes must follow
               "casa_helium_dora_attention": ({}, {"family": "helium"},
                                              dict(rank=4, alpha=8.0, targets=["linear_qkv", "linear_proj"],
                                                   layers=[0, 3], dora=True)),
               "insertion_lora_mlp": (dict(mechanism="insertion"), {}, LORA_MLP)}
ALL_VARIANTS = [*VARIANTS, *LM_VARIANTS]


def variant_config(name: str, vision: dict | None = None):
    import dataclasses

    from support.vlm import small_model_config

    from casa_megatron.config.schema import LoRAConfig, RopeScalingConfig

    fusion, lm, *lora = LM_VARIANTS[name] if name in LM_VARIANTS else (VARIANTS[name], {})
    cfg = small_model_config(vision, **fusion)
    if "rope_scaling" in lm:
        lm = {**lm, "rope_scaling": RopeScalingConfig(**lm["rope_scaling"])}
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, **lm))
    if lora:
        fields = dict(lora[0])
        vision_lora = fields.pop("vision", None)
        cfg = dataclasses.replace(cfg, freeze_lm=True, lora=LoRAConfig(**fields))
        if vision_lora:
            cfg.vision = dataclasses.replace(cfg.vision, trainable_blocks=0, lora=LoRAConfig(**vision_lora))
    return cfg


def tiny_tokenizer(out_dir: Path, vocab: int) -> Path:
    """A word-level tokenizer with our layout tokens (<image> = id 4) and ``vocab`` entries at most."""
    from casa_megatron.data.tokenization import build_word_tokenizer

    words = [f"w{i}" for i in range(vocab - 7)]
    return build_word_tokenizer([" ".join(words)], out_dir)


def layout_applies(layout: str, variant: str) -> bool:
    return layout != "pp2_encoder_split" or variant in ENCODER_SPLIT_VARIANTS


def train_config(name: str, tp: int, pp: int, tokenizer: Path, run_dir: Path, vision: dict | None = None,
                 vision_split=None):
    from casa_megatron.config.schema import OptimizerConfig, ParallelConfig, TrainConfig
    from casa_megatron.data.config import DataConfig

    return TrainConfig(model=variant_config(name, vision),
                       parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                               vision_blocks_per_pipeline_stage=vision_split),
                       data=DataConfig(tokenizer_path=str(tokenizer), image_seq_length=IMAGE_SLOTS),
                       optimizer=OptimizerConfig(warmup_steps=0, lr_new=1e-3, lr_pretrained=1e-3),
                       train_steps=1, run_dir=str(run_dir))


def one_step(model, cfg, batch, image_slots: int = IMAGE_SLOTS):
    """One real training step (DDP, distributed AdamW, megatron's schedule); returns the optimizer
    and scheduler that ``Checkpointer.save`` stores."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.training.optimizer import build_optimizer, wrap_ddp
    from casa_megatron.training.step import masked_mean

    ddp = wrap_ddp(ModelChunks([model]), cfg)
    optimizer, scheduler = build_optimizer(ddp, cfg)
    ddp[0].zero_grad_buffer()
    optimizer.zero_grad()

    def step(it, m):
        data = next(it)
        return m(data), lambda per_token: (masked_mean(per_token, data), {})

    b, s = batch.input_ids.shape
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=ddp.chunks,
                                num_microbatches=1, seq_length=s + image_slots, micro_batch_size=b)
    optimizer.step()
    scheduler.step(increment=1)
    return optimizer, scheduler


def _perturbed(name: str, vision: dict | None):
    """The variant's full (TP=1) weights plus noise, the same on every rank."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from support.vlm import perturbed_full_state

    initialize_parallel(1, 1, seed=0)
    ref = build_vlm(variant_config(name, vision), ParallelConfig(), IMAGE_SLOTS)
    return perturbed_full_state(ref)


def train_and_save(rank, world, root, variants, layouts, tokenizer, vision=None):
    """(worker) For each layout and variant: build, load the perturbed weights, train one step,
    save the training checkpoint under ``root/<layout>/<variant>``; return the logits."""
    from megatron.core import parallel_state

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from casa_megatron.training.checkpoint import Checkpointer
    from support.equivalence import stage_global_names
    from support.vlm import random_batch

    logits: Dict[str, Dict] = {}
    for name in variants:
        full = _perturbed(name, vision)
        for layout in layouts:
            if not layout_applies(layout, name):
                continue
            tp, pp, vision_split = LAYOUTS[layout]
            cfg = train_config(name, tp, pp, Path(tokenizer), Path(root) / layout / name, vision, vision_split)
            initialize_parallel(tp, pp, seed=0)
            model = build_vlm(cfg.model, cfg.parallel, IMAGE_SLOTS)
            to_global = stage_global_names(model)
            tied = {"output_layer.weight": "embedding.word_embeddings.weight"}  # the last stage's copy (PP)
            local = {n: full[tied.get(n) if n not in full and n in tied else to_global[n]]
                     for n, _ in model.named_parameters()}
            load_full_state(model, local, parallel_state.get_tensor_model_parallel_rank(), tp)
            optimizer, scheduler = one_step(model, cfg, random_batch(3))
            Checkpointer(Path(cfg.run_dir) / "checkpoints").save(1, model, optimizer, scheduler, {}, cfg)
            out = {kind: stage_logits(model, megatron_batch(make_case(kind)), IMAGE_SLOTS) for kind in ("image", "video")}
            if out["image"] is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                logits.setdefault(layout, {})[name] = out
    return logits


def export_all(rank, world, jobs):
    """(worker, world size 1) ``casa-convert export-hf CHECKPOINT OUT --no-progress`` for each job."""
    from casa_megatron.conversion.cli import main

    for checkpoint, out in jobs:
        assert main(["export-hf", checkpoint, out, "--no-progress"]) == 0, checkpoint
    return len(jobs)


def merge_logits(reports: Sequence[dict]) -> dict:
    merged: Dict[str, Dict] = {}
    for report in reports:
        for layout, by_variant in report.items():
            merged.setdefault(layout, {}).update(by_variant)
    return merged


def export_variants(root: Path, variants: Iterable[str] = tuple(ALL_VARIANTS), layouts=tuple(LAYOUTS)):
    """``(root, {layout: {variant: {kind: logits}}})``; the HF folder of each layout is
    ``root/hf/<layout>/<variant>``, and ``root/<variant>`` is the TP=2 one."""
    from support.vlm import VOCAB

    root = Path(root)
    tok = tiny_tokenizer(root / "tokenizer", VOCAB)
    variants = list(variants)
    reports = run_distributed(train_and_save, world_size=2, root=str(root), variants=variants,
                              layouts=list(layouts), tokenizer=str(tok))
    jobs = [(str(root / layout / name / "checkpoints"), str(root / "hf" / layout / name))
            for layout in layouts for name in variants if layout_applies(layout, name)]
    run_distributed(export_all, world_size=1, jobs=jobs)
    for name in variants:
        (root / name).symlink_to(root / "hf" / (PRIMARY if PRIMARY in layouts else layouts[0]) / name)
    return root, merge_logits(reports)

#!/usr/bin/env python
"""Print a model's parameter budget: per component, total / new (CASA, projector) / trainable,
and the memory each GPU holds for weights, gradients and optimizer state at the recipe's layout.

    python tools/describe_model.py configs/tiny_cpu_synthetic.yaml [key=value ...] [--gpus N]

Builds the model on one CPU process (no data, no training), so a recipe's size, which layers
hold CASA modules and whether its weights fit can be checked before asking for GPUs. ``--gpus``
(default: TP x PP, i.e. DP=1) sets the data-parallel size the distributed optimizer shards its
state over (``training/memory_plan.py``; activations come on top).
"""

from __future__ import annotations

import sys
from collections import defaultdict


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a training config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for casa-train")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the run (DP = GPUs / (TP x PP)); "
                        "default TP x PP")
    args = parser.parse_args(argv)
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import ConfigError, ParallelConfig, TrainConfig

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, ParallelConfig(), cfg.data.image_seq_length)
    rows = defaultdict(lambda: [0, 0, 0])
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if part == "decoder" and ".casa_" in name:
            part = "decoder (CASA)"
        elif part in ("decoder", "vision") and "_lora." in name:
            part = f"{part} (LoRA)"
        rows[part][0] += p.numel()
        rows[part][1] += p.numel() if p.casa_new else 0
        rows[part][2] += p.numel() if p.requires_grad else 0
    print(f"{'component':<18}{'params':>14}{'new':>14}{'trainable':>14}")
    for part, (total, new, trainable) in rows.items():
        print(f"{part:<18}{total:>14,}{new:>14,}{trainable:>14,}")
    totals = [sum(r[i] for r in rows.values()) for i in range(3)]
    print(f"{'total':<18}{totals[0]:>14,}{totals[1]:>14,}{totals[2]:>14,}")
    layers = [l.layer_number - 1 for l in model.casa_layers()]
    print(f"CASA layers ({cfg.model.fusion.mechanism}, {cfg.model.fusion.placement}"
          f"{', shared projections' if cfg.model.fusion.share_projections else ''}): {layers}")
    for lora, what, n in ((cfg.model.lora, "LM layers", cfg.model.lm.num_layers),
                          (cfg.model.vision.lora, "encoder blocks", cfg.model.vision.num_layers)):
        if lora.enabled:
            kind = "DoRA" if lora.dora else "LoRA"
            scale = f"alpha {lora.alpha:g}" + (" (rsLoRA: / sqrt(rank))" if lora.rslora else "")
            print(f"{kind} rank {lora.rank}, {scale} on {', '.join(lora.targets)} of {what} "
                  f"{lora.adapted_layers(n)}")
    stages = print_stages(model, cfg) if cfg.parallel.pipeline_model_parallel_size > 1 else [list(model.named_parameters())]
    return print_weight_memory(cfg, stages, args.gpus)


def print_weight_memory(cfg, stages, gpus: int) -> int:
    """Per pipeline stage: bytes per GPU of its parameters, gradient buffers and optimizer state."""
    from casa_megatron.training.memory_plan import parameter_shapes, weight_memory

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    gpus = gpus or tp * pp
    if gpus % (tp * pp):
        print(f"--gpus {gpus} is not a multiple of TP x PP = {tp * pp}", file=sys.stderr)
        return 2
    dp, bf16, dist_opt = gpus // (tp * pp), cfg.precision.bf16, cfg.optimizer.use_distributed_optimizer
    print(f"weights, gradients and optimizer state per GPU (TP={tp}, PP={pp}, DP={dp}, "
          f"{'bf16' if bf16 else 'fp32'}, {'distributed' if dist_opt else 'replicated'} optimizer; "
          "activations on top):")
    print(f"{'stage':<18}{'weights':>12}{'gradients':>12}{'optimizer':>12}{'total':>12}")
    for k, named in enumerate(stages):
        plan = weight_memory(parameter_shapes(named), tp, dp, bf16, dist_opt)
        unit, size = ("GiB", 2 ** 30) if plan.total >= 2 ** 30 else ("MiB", 2 ** 20)
        print(f"{k:<18}" + "".join(f"{v / size:>8.2f} {unit}"
                                   for v in (plan.params, plan.grads, plan.optimizer, plan.total)))
    return 0


def print_stages(model, cfg) -> None:
    """Parameters each pipeline stage holds (TP=1 equivalent): the first stage the embedding,
    encoder and projector besides its LM layers (with the encoder over several stages: each its
    blocks, the encoder's last one the projector), the last the final norm and the output layer (a
    copy of the embedding when they are tied); with virtual stages, each rank's LM layers are
    those of its chunks. Trainable ones also carry gradients and Adam state. Returns each stage's
    named parameters."""
    from casa_megatron.config.pipeline_split import describe_split, describe_virtual_split

    pp = cfg.parallel.pipeline_model_parallel_size
    counts = cfg.parallel.stage_layer_counts(cfg.model.lm.num_layers)
    blocks = cfg.parallel.stage_vision_blocks(cfg.model.vision.num_layers)
    virtual = cfg.parallel.virtual_stage_layer_counts(cfg.model.lm.num_layers)  # = counts without chunks
    # virtual stage j is chunk j // pp of rank j % pp (the interleaved schedule; j = rank without it)
    stage_of_layer = [j % pp for j, n in enumerate(virtual) for _ in range(n)]
    stage_of_block = [k for k, n in enumerate(blocks) for _ in range(n)]
    encoder_last = stage_of_block[-1]
    totals = [[0, 0] for _ in counts]
    named = [[] for _ in counts]
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            stage = stage_of_layer[int(name.split(".")[2])]
        elif name.startswith(("decoder.final_layernorm", "output_layer")):
            stage = len(counts) - 1
        elif name.startswith("vision.blocks."):
            stage = stage_of_block[int(name.split(".")[2])]
        elif name.startswith(("projector.", "vision.final_layernorm")):
            stage = encoder_last
        else:
            stage = 0
        totals[stage][0] += p.numel()
        totals[stage][1] += p.numel() if p.requires_grad else 0
        named[stage].append((name, p))
    if cfg.model.lm.tie_word_embeddings:  # the last stage keeps its own copy of the tied weight
        weight = model.embedding.word_embeddings.weight
        totals[-1][0] += weight.numel()
        totals[-1][1] += weight.numel() if weight.requires_grad else 0
        named[-1].append(("output_layer.weight", weight))
    chunks = cfg.parallel.model_chunks
    print(f"pipeline: {describe_split(counts, blocks) if chunks == 1 else describe_virtual_split(virtual, pp)}")
    print(f"{'stage':<18}{'LM layers':>14}{'enc. blocks':>14}{'params':>14}{'trainable':>14}")
    for k, n in enumerate(counts):
        print(f"{k:<18}{n:>14}{blocks[k]:>14}{totals[k][0]:>14,}{totals[k][1]:>14,}")
    return named


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

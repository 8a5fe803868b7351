"""Parts (b) and (c): the Transformer Engine spec against the local spec, and bf16 / FP8 steps.

(b) One CASA VLM is built with the local spec and one with the TE spec; the local weights are
copied into the TE model (names are the same except the norms TE fuses into the next linear:
``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight`` and
``pre_mlp_layernorm.weight`` -> ``mlp.linear_fc1.layer_norm_weight`` of plain megatron layers).
Both run the same packed batch in bf16; loss, logits and every mapped gradient are compared
(rel. error, bf16 tolerance 2e-2).

(c) The CASA model at the paper shape (``gpu_paper.yaml``), TE spec, one bf16 and one FP8 run
(TE's delayed-scaling recipe, ``hybrid`` format): loss of the first step (same init and batch),
median step time, peak memory; FP8 speed-up over bf16 (issue target >= 1.3x).
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.gpu_parts.common import (
    NotAvailable, PartResult, median, part_device, peak_memory_gib, rel_err, require_cuda, reset_peak_memory, target,
    time_it,
)

BF16_TOL = 2e-2
TE_FUSED_NORMS = (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
                  ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def local_name_for(te_name: str, local_names) -> str:
    """The local-spec parameter holding the same tensor as TE-spec parameter ``te_name``."""
    if te_name in local_names:
        return te_name
    for fused, unfused in TE_FUSED_NORMS:
        if te_name.endswith(fused):
            candidate = te_name[: -len(fused)] + unfused
            if candidate in local_names:
                return candidate
    raise KeyError(f"TE-spec parameter {te_name!r} has no local-spec counterpart")


def _require_te(what: str = "the Transformer Engine spec"):
    require_cuda(what)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise NotAvailable(f"Transformer Engine does not import: {type(exc).__name__}: {exc}") from exc


def _bench_config(path: str, quick: bool, **overrides):
    from benchmarks.train_efficiency import load

    cfg = load(path, [])
    if quick:
        cfg.steps, cfg.warmup_steps = 2, 1
    return dataclasses.replace(cfg, **overrides)


SPEC_CASES = {  # part (b): name -> ModelConfig fields over the small CASA model
    "casa": {},
    # LoRA on every LM linear: TE's layers are unfused where adapted (specs.py), never run before
    "casa + LoRA (frozen LM, rank 8)": {"freeze_lm": True, "lora": {"rank": 8, "alpha": 16.0}},
    # DoRA: the magnitude hook on TE's linears (their weight, their bias handling), never run before
    "casa + DoRA (frozen LM, rank 8)": {"freeze_lm": True, "lora": {"rank": 8, "alpha": 16.0, "dora": True}},
}


def spec_model_config(case: str):
    """The small CASA model of part (b) (CASA layers 1 and 3, plain megatron layers 0 and 2)."""
    from casa_megatron.config.schema import FusionConfig, LanguageModelConfig, LoRAConfig, ModelConfig, VisionConfig

    fields = dict(SPEC_CASES[case])
    if "lora" in fields:
        fields["lora"] = LoRAConfig(**fields["lora"])
    return ModelConfig(
        lm=LanguageModelConfig(vocab_size=1024, num_layers=4, hidden_size=512, num_attention_heads=8,
                               num_query_groups=4, ffn_hidden_size=1408),
        vision=VisionConfig(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512),
        fusion=FusionConfig(every_n=2), **fields)


def compare_specs(model_cfg, impls=("local", "transformer_engine"), device: str = "cuda") -> dict:
    """Build ``model_cfg`` with each implementation, copy the first one's weights into the second
    (LoRA's ``B`` drawn non-zero first, so the adapters act), run one packed bf16 batch through
    both: relative errors of loss, logits and every gradient. ``impls=("local", "local")`` on the
    CPU runs this very code (tests/benchmarks/test_gpu_check.py)."""
    from benchmarks.common import BenchConfig, ImageHeavyData, build_model, image_heavy_batch
    from casa_megatron.model.lora import lora_adapters

    data = ImageHeavyData(micro_batch_size=2, seq_length=256, samples_per_row=4, image_grid=[8, 8])
    models = []
    for impl in impls:
        cfg = BenchConfig(model=dataclasses.replace(model_cfg, transformer_impl=impl), data=data,
                          dtype="bfloat16", vision="frozen_stub")
        models.append(build_model(cfg, "casa", data.image_seq_length))
    ref, other = models
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, adapter in lora_adapters(ref):
            adapter.lora_b.copy_(0.02 * torch.randn(adapter.lora_b.shape, generator=g))
    ref_params = dict(ref.named_parameters())
    mapping = {n: local_name_for(n, ref_params) for n, _ in other.named_parameters()}
    unused = set(ref_params) - set(mapping.values())
    if unused:
        raise KeyError(f"{impls[0]}-spec parameters without a {impls[1]}-spec counterpart: {sorted(unused)[:5]}")
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(ref_params[mapping[n]])
    batch = image_heavy_batch(data, model_cfg.lm.vocab_size, seed=3).to(device)
    outs = []
    for model in models:
        loss = (model(batch).float() * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        with torch.no_grad():
            logits = model(dataclasses.replace(batch, labels=None)).float()
        outs.append((loss.detach(), logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (r_loss, r_logits, r_grads), (o_loss, o_logits, o_grads) = outs
    grad_errs = {n: rel_err(g, r_grads[mapping[n]]) for n, g in o_grads.items()}
    worst = max(grad_errs, key=grad_errs.get)
    return {"loss_local": r_loss.item(), "loss_te": o_loss.item(), "loss_rel_err": rel_err(o_loss, r_loss),
            "logits_rel_err": rel_err(o_logits, r_logits), "max_grad_rel_err": grad_errs[worst],
            "worst_grad": worst, "params_compared": len(grad_errs),
            "adapters": sum(1 for _ in lora_adapters(other)), "tolerance": BF16_TOL}


def te_vs_local(quick: bool = False) -> PartResult:
    _require_te()
    result = PartResult("b", "Transformer Engine spec vs local spec, same weights (bf16)")
    result.data = {case: compare_specs(spec_model_config(case)) for case in SPEC_CASES}
    rows, failed = [], []
    for case, d in result.data.items():
        ok = max(d["loss_rel_err"], d["logits_rel_err"], d["max_grad_rel_err"]) <= BF16_TOL
        result.targets[f"TE spec == local spec (bf16), {case}"] = {"value": ok, "target": f"rel err <= {BF16_TOL}",
                                                                   "met": ok}
        failed += [] if ok else [case]
        rows.append(f"| {case} | {d['loss_local']:.4f} vs {d['loss_te']:.4f}: {d['loss_rel_err']:.2e} | "
                    f"{d['logits_rel_err']:.2e} | {d['max_grad_rel_err']:.2e} (`{d['worst_grad']}`, of "
                    f"{d['params_compared']}) |")
    result.markdown = ("CASA VLM (4 layers, hidden 512, CASA in layers 1 and 3; frozen stub encoder), one packed "
                       "batch, bf16; relative errors.\n\n| model | loss | logits | worst gradient |\n|---|---|---|---|\n"
                       + "\n".join(rows))
    if failed:
        result.status, result.reason = "failed", f"TE spec differs from the local spec beyond {BF16_TOL}: {failed}"
    return result


def precision_steps(config_path: str = None, quick: bool = False, rehearse: bool = False) -> PartResult:
    """On a GPU: TE spec, bf16 then FP8. In a CPU rehearsal: the local spec in bf16 (the same loop,
    batches and timing code); the FP8 row is reported "not available" (TE needs a GPU)."""
    device = part_device(rehearse, "bf16 / FP8 training steps")
    fp8_missing = None
    try:
        _require_te("FP8 training steps")
    except NotAvailable as exc:
        if not rehearse:
            raise
        fp8_missing = str(exc)
    from benchmarks.common import build_model, image_heavy_batch, train_step
    from benchmarks.train_efficiency import ROOT
    from casa_megatron.config.schema import PrecisionConfig

    result = PartResult("c", "bf16 and FP8 training steps of the CASA model")
    path = config_path or str(ROOT / "benchmarks" / "configs" / "gpu_paper.yaml")
    cfg = _bench_config(path, quick)
    impl = "local" if fp8_missing else "transformer_engine"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, transformer_impl=impl), dtype="bfloat16")
    data, rows = cfg.data, []
    precisions = [("bf16", None)]
    if not fp8_missing:
        precisions.append(("fp8 (hybrid, delayed scaling)", PrecisionConfig(fp8="hybrid")))
    for name, precision in precisions:
        reset_peak_memory(device)
        model = build_model(cfg, "casa", data.image_seq_length, precision=precision)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        batches = [image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed + k).to(device)
                   for k in range(data.num_microbatches)]
        seq = data.seq_length + data.image_seq_length
        losses = [train_step(model, optimizer, batches, seq, data.micro_batch_size)]
        times = time_it(lambda: losses.append(train_step(model, optimizer, batches, seq, data.micro_batch_size)),
                        cfg.steps, warmup=cfg.warmup_steps)
        rows.append({"precision": name, "first_loss": losses[0], "last_loss": losses[-1],
                     "step_time_s": median(times), "peak_memory_gib": peak_memory_gib(device)})
        model = optimizer = None  # freed before the next build
    speedup = rows[0]["step_time_s"] / rows[1]["step_time_s"] if len(rows) == 2 else None
    result.data = {"rows": rows, "fp8_speedup": speedup, "config": path, "spec": impl, "device": str(device),
                   "fp8_not_available": fp8_missing}
    result.targets = {"FP8 step speed-up over bf16": target(speedup, 1.3, "min")}
    lines = ["| precision | first loss | last loss | step (s) | peak memory (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | {r['step_time_s']:.3f} | "
              + (f"{r['peak_memory_gib']:.1f} |" if r["peak_memory_gib"] is not None else "n/a |") for r in rows]
    if fp8_missing:
        lines.append(f"| fp8 | not available: {fp8_missing} | | | |")
    result.markdown = (f"CASA model at `{path}` ({impl} spec, {device.type}), {cfg.steps} timed steps after "
                       f"{cfg.warmup_steps} warm-up.\n\n" + "\n".join(lines)
                       + (f"\n\nFP8 speed-up: {speedup:.2f}x" if speedup else ""))
    return result

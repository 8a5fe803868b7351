"""The training loop, top to bottom: set up, then ``train_steps`` optimizer steps.

Each step runs megatron-core's forward-backward schedule over the micro-batches of the global
batch (1F1B when pipelined), finalises gradients, clips and steps AdamW. Metrics go to stdout,
``metrics.jsonl`` and the tracker; the loss curve is plotted at the end.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from casa_megatron.config import save_config, to_dict
from casa_megatron.config.schema import TrainConfig
from casa_megatron.data.synthetic import synthetic_batches
from casa_megatron.model.build import build_vlm
from casa_megatron.parallel import initialize_parallel
from casa_megatron.tracking import make_tracker
from casa_megatron.training.step import clip_grads, finalize_grads, forward_step

TEXT_ONLY_FLOOR = (math.log(8) + math.log(2)) / 2  # best loss without looking at images


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    new = [p for p in model.parameters() if p.requires_grad and p.casa_new]
    old = [p for p in model.parameters() if p.requires_grad and not p.casa_new]
    groups = [{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in
              ((new, cfg.optimizer.lr_new), (old, cfg.optimizer.lr_pretrained)) if ps]
    return torch.optim.AdamW(groups, weight_decay=cfg.optimizer.weight_decay)


def _set_lr(optimizer, step: int, warmup: int) -> float:
    scale = min(1.0, step / max(1, warmup))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale
    return optimizer.param_groups[0]["lr"]


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="CASA (answer-token loss)")
    ax.axhline(TEXT_ONLY_FLOOR, ls="--", c="grey", label="best without vision")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    par = cfg.parallel
    initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.seed)
    run_dir = Path(cfg.run_dir)
    is_logger = parallel_state.is_pipeline_last_stage() and \
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    model = build_vlm(cfg.model, par, cfg.data.image_seq_length)
    optimizer = build_optimizer(model, cfg)
    dp = parallel_state.get_data_parallel_world_size()
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    data = synthetic_batches(cfg.micro_batch_size, cfg.data.seq_length, cfg.data.image_size,
                             seed=cfg.data.seed + parallel_state.get_data_parallel_rank())
    tracker = make_tracker(cfg.tracking.enabled, is_logger, run_dir, cfg.tracking.experiment,
                           cfg.tracking.tracking_uri)
    tracker.log_params(to_dict(cfg))
    if is_logger:
        tracker.log_artifact(str(run_dir / "config.yaml"))
    metrics_path = run_dir / "metrics.jsonl"
    if is_logger:
        metrics_path.write_text("")
    fb = get_forward_backward_func()
    summary = {}
    try:
        for step in range(1, cfg.train_steps + 1):
            start = time.perf_counter()
            lr = _set_lr(optimizer, step, cfg.optimizer.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            losses = fb(forward_step_func=forward_step, data_iterator=data, model=[model],
                        num_microbatches=num_micro,
                        seq_length=cfg.data.seq_length + cfg.data.image_seq_length,
                        micro_batch_size=cfg.micro_batch_size)
            finalize_grads(model)
            grad_norm = clip_grads(model, cfg.optimizer.clip_grad)
            optimizer.step()
            step_time = time.perf_counter() - start
            if not is_logger or (step % cfg.log_interval and step != cfg.train_steps):
                continue
            loss = torch.stack([l["loss"] for l in losses]).mean().item()
            metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": step_time,
                       "text_tokens_per_s": cfg.global_batch_size * cfg.data.seq_length / step_time,
                       "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            tracker.log_metrics(metrics, step)
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {float(grad_norm):.3f} "
                  f"| {metrics['text_tokens_per_s']:.0f} text tok/s | {step_time * 1000:.0f} ms", flush=True)
            summary = {"final_loss": loss, "steps": step}
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    if is_logger:
        plot_loss(metrics_path, run_dir / "loss.png")
        tracker.log_artifact(str(run_dir / "loss.png"))
        print(f"done: loss {summary['final_loss']:.4f} (text-only floor {TEXT_ONLY_FLOOR:.3f}); "
              f"run dir {run_dir}; MLflow store {getattr(tracker, 'uri', 'off')}", flush=True)
    tracker.finish("FINISHED")
    return summary

"""The training loop, top to bottom: set up (or resume), then optimizer steps until done.

Each step runs megatron-core's forward-backward schedule over the micro-batches of the global
batch (1F1B when pipelined) on the DDP-wrapped model; megatron's (distributed) optimizer
reduces gradients, clips by the global norm and steps AdamW; the scheduler sets both learning
rates. Checkpoints every ``checkpoint.save_interval`` steps, at the end, and when SIGTERM
arrives (SLURM's pre-emption signal): the step in flight finishes, a checkpoint is written,
the tracker run is marked KILLED. Every ``eval_interval`` steps (and at the last one) the
validation loss on ``data.valid`` is computed under the same layout (``evaluation.py``).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from casa_megatron.config import save_config, to_dict
from casa_megatron.config.schema import TrainConfig
from casa_megatron.data import make_train_iterator
from casa_megatron.model.build import build_vlm
from casa_megatron.parallel import initialize_parallel
from casa_megatron.tracking import make_tracker
from casa_megatron.training.checkpoint import Checkpointer
from casa_megatron.training.evaluation import evaluate
from casa_megatron.training.metrics import MetricsLog, peak_memory_bytes
from casa_megatron.training.optimizer import build_optimizer, current_lrs, wrap_ddp
from casa_megatron.training.step import forward_step

TEXT_ONLY_FLOOR = (math.log(8) + math.log(2)) / 2  # synthetic task: best loss without images


class _StopFlag:
    """Set by SIGTERM; checked between steps so a checkpoint is never cut in half."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _mean_over_dp(value: torch.Tensor) -> float:
    value = value.clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    par = cfg.parallel
    initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.seed)
    run_dir = Path(cfg.run_dir)
    last_stage = parallel_state.is_pipeline_last_stage()
    is_logger = last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.get_data_parallel_rank() == 0
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    params_dtype = torch.bfloat16 if cfg.precision.bf16 else torch.float32
    model = build_vlm(cfg.model, par, cfg.data.image_seq_length, params_dtype, cfg.precision)
    ddp = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(ddp, cfg)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    data = make_train_iterator(cfg.data, cfg.micro_batch_size, dp_rank, dp_size, cfg.data.seed,
                               fusion=cfg.model.fusion.mechanism)
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)

    ckpt = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep_last)
    start_step, resumed_from = 0, None
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        start_step, data_state = ckpt.load(latest, model, optimizer, scheduler)
        if data_state is not None:
            data.load_state_dict(data_state)
        resumed_from = str(latest)

    tracker = make_tracker(cfg.tracking.enabled, is_logger, run_dir, cfg.tracking.experiment,
                           cfg.tracking.tracking_uri, cfg.tracking.system_metrics,
                           cfg.tracking.system_metrics_interval_s)
    tracker.log_params(to_dict(cfg))
    tracker.set_tags({"checkpoint_dir": str(ckpt.dir.resolve()), "resumed_from": resumed_from or "",
                      "start_step": str(start_step)})
    if is_logger:
        tracker.log_artifact(str(run_dir / "config.yaml"))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_logger, truncate_after=start_step)
    if is_logger and resumed_from:
        print(f"resumed from {resumed_from} at step {start_step}", flush=True)

    stop = _StopFlag()
    fb = get_forward_backward_func()
    seq_length = cfg.data.seq_length + cfg.data.image_seq_length
    step, saved_at, status = start_step, None, "FINISHED"
    try:
        while step < cfg.train_steps:
            step += 1
            start = time.perf_counter()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = fb(forward_step_func=forward_step, data_iterator=data, model=[ddp],
                        num_microbatches=num_micro, seq_length=seq_length,
                        micro_batch_size=cfg.micro_batch_size)
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            step_time = time.perf_counter() - start
            if last_stage and (step % cfg.log_interval == 0 or step == cfg.train_steps):
                loss = _mean_over_dp(torch.stack([l["loss"] for l in losses]).mean())
                lr_new, lr_pre = current_lrs(optimizer, cfg)
                metrics = {"loss": loss, "lr_new": lr_new, "lr_pretrained": lr_pre,
                           "grad_norm": float(grad_norm), "step_time_s": step_time,
                           "text_tokens_per_s": cfg.global_batch_size * cfg.data.seq_length / step_time,
                           "peak_memory_gib": peak_memory_bytes() / 2**30}
                tracker.log_metrics(metrics, step)
                log.write(step, metrics)
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.train_steps):
                valid_loss = evaluate(ddp, cfg, num_micro)
                if valid_loss is not None:
                    tracker.log_metrics({"valid_loss": valid_loss}, step)
                    log.write_eval(step, valid_loss)
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                ckpt.save(step, model, optimizer, scheduler, data.state_dict(), cfg)
                saved_at = step
            if _any_rank(stop.requested):
                status = "KILLED"
                break
        if saved_at != step:
            ckpt.save(step, model, optimizer, scheduler, data.state_dict(), cfg)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        stop.restore()
    if is_logger and log.rows:
        log.plot(run_dir / "loss.png", floor=TEXT_ONLY_FLOOR if cfg.data.is_synthetic else None)
        tracker.log_artifact(str(run_dir / "loss.png"))
        print(f"{'stopped by SIGTERM' if status == 'KILLED' else 'done'} at step {step}: "
              f"loss {log.rows[-1]['loss']:.4f}; run dir {run_dir}; checkpoints {ckpt.dir}; "
              f"MLflow {getattr(tracker, 'uri', 'off')}", flush=True)
    tracker.finish(status)
    return {"final_loss": log.rows[-1]["loss"] if log.rows else None, "steps": step, "status": status}


def _any_rank(flag: bool) -> bool:
    """Every rank must agree to stop at the same step (a signal may reach ranks at different times)."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

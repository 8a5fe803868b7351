"""The training loop, top to bottom: set up (or resume), then optimizer steps until done.

Each step runs megatron-core's forward-backward schedule over the micro-batches of the global
batch (1F1B when pipelined, interleaved 1F1B over the model chunks of
``parallel.virtual_pipeline_model_parallel_size``) on the DDP-wrapped model chunks; megatron's (distributed) optimizer
reduces gradients, clips by the global norm and steps AdamW; the scheduler sets both learning
rates. Checkpoints every ``checkpoint.save_interval`` steps, at the end, and when SIGTERM
(SLURM's pre-emption signal) or SIGINT (Ctrl-C) arrives: the step in flight finishes, a
checkpoint is written, the tracker run is marked KILLED (runtime/signals.py). Every
``eval_interval`` steps (and at the last one) the validation loss on ``data.valid`` is computed
under the same layout (``evaluation.py``).

Before any of that, ``RunSession`` (session.py) locks the run directory and refuses what would
lose work; ``resume`` (resume.py) picks the newest usable checkpoint and checks that it fits
the config. The run's ``config.yaml`` and ``metrics.jsonl`` are written only after that.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from casa_megatron.config import to_dict
from casa_megatron.config.run_files import TEMPLATE_COPY, save_run_config
from casa_megatron.config.limits import check_limits
from casa_megatron.config.pipeline_split import describe_split, describe_virtual_split
from casa_megatron.config.schema import TrainConfig
from casa_megatron.data import make_train_iterator, prepare
from casa_megatron.data.recipe import expand
from casa_megatron.data.reshard import reshard_position
from casa_megatron.data.tokenization import check_vocabulary
from casa_megatron.model.build import build_model_chunks
from casa_megatron.parallel import initialize_parallel
from casa_megatron.parallel.rank0 import on_rank0
from casa_megatron.runtime.logs import promote_rank
from casa_megatron.runtime.signals import StopRequest
from casa_megatron.tracking import make_tracker
from casa_megatron.training.batch_schedule import BatchSchedule
from casa_megatron.training.checkpoint import Checkpointer
from casa_megatron.training.data_stats import describe, skip_metrics, skip_totals
from casa_megatron.training.eval_only import evaluate_checkpoint
from casa_megatron.training.evaluation import check_validation, evaluate
from casa_megatron.training.failures import TrainingDiverged, non_finite_gradients
from casa_megatron.training.generation_eval import maybe_generation_eval
from casa_megatron.training.manual_gc import ManualGC
from casa_megatron.training.memory_plan import parameter_shapes, weight_memory
from casa_megatron.training.metrics import MetricsLog, peak_memory_bytes
from casa_megatron.training.optimizer import build_optimizer, current_lrs, finish_param_gather, wrap_ddp
from casa_megatron.training.params_norm import params_norm
from casa_megatron.training.pretrained import start_from_pretrained
from casa_megatron.training.profiling import StepProfiler
from casa_megatron.training.replica_check import check_replicas
from casa_megatron.training.resume import Resumed, resume
from casa_megatron.training.session import RunSession
from casa_megatron.training.step import data_for_chunks, forward_step
from casa_megatron.training.throughput import FlopMeter, peak_tflops, throughput_metrics

logger = logging.getLogger("casa_megatron.train")

TEXT_ONLY_FLOOR = (math.log(8) + math.log(2)) / 2  # synthetic task: best loss without images


def _mean_over_dp(value: torch.Tensor) -> float:
    value = value.clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


def _plot(log: MetricsLog, cfg, run_dir: Path, is_logger: bool) -> bool:
    """``loss.png`` (written atomically) from the rows so far; True if written."""
    if not (is_logger and log.rows):
        return False
    log.plot(run_dir / "loss.png", floor=TEXT_ONLY_FLOOR if cfg.data.is_synthetic else None)
    return True


def _step_loss(losses, per_token: bool) -> float:
    """The step's loss as it was optimised: over every answer token of the global batch, or the
    mean over data-parallel ranks of the mean over micro-batches of each one's token mean."""
    if not per_token:
        return _mean_over_dp(torch.stack([l["loss"] for l in losses]).mean())
    sums = torch.stack([torch.stack([l["loss_sum"].double(), l["tokens"].double()]) for l in losses]).sum(0)
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return (sums[0] / sums[1].clamp(min=1)).item()


def train(cfg: TrainConfig) -> dict:
    check_limits(cfg)  # load_config did it already; a config built in code gets it here
    cfg.validate()
    par = cfg.parallel
    initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.seed,
                        par.virtual_pipeline_model_parallel_size)
    run_dir = Path(cfg.run_dir)
    ckpt = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep_last,
                        cfg.checkpoint.verify, cfg.checkpoint.async_save, cfg.checkpoint.optimizer_format)
    session = RunSession(cfg, run_dir, ckpt)
    session.open()  # lock, writable check, resume pre-check: refuses before anything is written
    try:
        if cfg.skip_train:  # Megatron-LM's --skip-train: score the checkpoint, take no step (eval_only.py)
            _index_data_together(cfg.data, training=False)  # it reads data.valid only
            return evaluate_checkpoint(cfg, run_dir, ckpt)
        return _train(cfg, run_dir, ckpt)
    finally:
        session.close()


def _load_data_state(data, state, dp_rank: int, dp_size: int) -> None:
    if "reshard" in state:  # the checkpoint was written by another number of data-parallel ranks
        old = state["reshard"]
        try:
            moved = reshard_position(old, dp_rank, dp_size)
        except (ValueError, KeyError) as exc:
            logger.warning("data order starts afresh: the data position of dp_size=%d cannot be carried to "
                           "dp_size=%d (%s)", len(old), dp_size, exc)
            return
        logger.info("data position carried from dp_size=%d to dp_size=%d: each source continues at its first "
                    "sample not used yet (global index %s); %d samples used by the faster ranks are read once more",
                    len(old), dp_size, moved.watermarks, moved.reread)
        state = moved.state
    try:
        data.load_state_dict(state)
    except ValueError as exc:  # the dataset itself changed (e.g. regenerated with more samples)
        logger.warning("data order starts afresh: the saved data position does not fit (%s)", exc)


def _index_data_together(data_cfg, training: bool = True) -> None:
    """Data files without a saved index (tar shards, JSON datasets) are indexed once, shared among
    all ranks, before any rank opens its data (else every rank scans every file on a first
    start; docs/data.md). ``training=False``: the validation sources only."""
    if data_cfg.is_synthetic:
        return
    sources = data_cfg.source_specs() if training else []
    specs = expand(sources + (data_cfg.valid_specs() or []))  # a recipe's datasets
    files = prepare.data_files([spec.path for spec in specs])
    if files:
        prepare.index_my_share(files, dist.get_rank(), dist.get_world_size(), data_cfg.index_dir)
        dist.barrier()


def _train(cfg: TrainConfig, run_dir: Path, ckpt: Checkpointer) -> dict:
    started = time.monotonic()  # exit_duration_mins counts set-up too, as a scheduler's limit does
    par = cfg.parallel
    last_stage = parallel_state.is_pipeline_last_stage()
    is_logger = last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.get_data_parallel_rank() == 0
    promote_rank(is_logger or dist.get_rank() == 0)

    data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    # micro-batches per step: constant, or ramped up by consumed samples; checked before the model
    batches = BatchSchedule(cfg, dp_size, dist.get_rank())
    # before the model (a token past the table fails late); the tokenizer read once, the verdict on every rank
    on_rank0(lambda: check_vocabulary(cfg.data, cfg.model.lm.vocab_size))
    _index_data_together(data_cfg)
    if cfg.eval_interval:
        check_validation(cfg, data_cfg)  # before the model: fails now, not at the first evaluation
    generation = maybe_generation_eval(cfg)  # held-out answers by generation: its items read now
    params_dtype = torch.bfloat16 if cfg.precision.bf16 else torch.float32
    model = build_model_chunks(cfg.model, par, cfg.data.image_seq_length, params_dtype, cfg.precision)
    stage_layers = stage_blocks = None
    pp, chunks = par.pipeline_model_parallel_size, par.model_chunks
    if pp > 1:
        stage_layers = par.virtual_stage_layer_counts(cfg.model.lm.num_layers)  # per (virtual) stage
        stage_blocks = par.stage_vision_blocks(cfg.model.vision.num_layers) if chunks == 1 else None
    if stage_layers and dist.get_rank() == 0:
        where = ("embedding and patch embedding on the first stage, projector on the encoder's last"
                 if par.vision_stages > 1 else "vision encoder, projector and embedding on the first stage")
        split = describe_split(stage_layers, stage_blocks) if chunks == 1 else describe_virtual_split(stage_layers, pp)
        logger.info("pipeline: %s (%s)", split, where)
    pretrained_from = start_from_pretrained(model, cfg, ckpt)  # weights only, before the optimizer
    ddp = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(ddp, cfg)
    if dist.get_rank() == 0:  # this rank's parameters are already split: TP=1 in the plan
        plan = weight_memory(parameter_shapes(model.named_parameters()), 1, dp_size,
                             cfg.precision.bf16, cfg.optimizer.use_distributed_optimizer)
        logger.info("rank 0 holds %.3f GiB of weights, %.3f of gradient buffers and %.3f of optimizer state "
                    "(%.3f GiB before activations; training/memory_plan.py)", *plan.gib())
    data = make_train_iterator(data_cfg, cfg.micro_batch_size, dp_rank, dp_size, cfg.data.seed,
                               fusion=cfg.model.fusion.mechanism)

    resumed = resume(ckpt, cfg, model, optimizer, scheduler) if cfg.checkpoint.resume else Resumed()
    if resumed.data_state is not None:
        _load_data_state(data, resumed.data_state, dp_rank, dp_size)
    start_step = resumed.step
    consumed = batches.consumed_after(start_step)
    resumed_from = str(resumed.path) if resumed.path is not None else None
    if dist.get_rank() == 0:  # the run is accepted: only now is anything of it written
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, run_dir)
    dist.barrier()  # the logging rank (last pipeline stage) uploads config.yaml next

    tracker = make_tracker(cfg.tracking.enabled, is_logger, run_dir, cfg.tracking.experiment,
                           cfg.tracking.tracking_uri, cfg.tracking.system_metrics,
                           cfg.tracking.system_metrics_interval_s)
    tracker.log_params(to_dict(cfg))
    tracker.set_tags({"checkpoint_dir": str(ckpt.dir.resolve()), "resumed_from": resumed_from or "",
                      "start_step": str(start_step), "pretrained_from": pretrained_from or ""})
    if is_logger:
        tracker.log_artifact(str(run_dir / "config.yaml"))
        if cfg.data.chat_template:
            tracker.log_artifact(str(run_dir / TEMPLATE_COPY))
        for stale in getattr(tracker, "closed_stale", []):
            logger.warning("MLflow run %s of this run dir was left RUNNING by a killed process: marked KILLED", stale)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_logger, truncate_after=start_step)
    if is_logger and resumed_from:
        logger.info("resumed from %s at step %d", resumed_from, start_step)
    if start_step >= cfg.train_steps:
        logger.info("the checkpoint is at step %d, train_steps=%d: nothing to train (raise train_steps to "
                    "continue)", start_step, cfg.train_steps)

    stop = StopRequest()
    fb = get_forward_backward_func()
    seq_length = cfg.data.seq_length + cfg.data.image_seq_length
    step, saved_at, status = start_step, (start_step if resumed_from else None), "FINISHED"
    skipped_seen, held_logged = 0, 0.0  # seconds saves held the loop, up to the last logged row
    meter = FlopMeter(cfg.model, cfg.data.image_seq_length, stage_layers, stage_blocks,
                      ranks=pp if chunks > 1 else None).over(data)  # throughput.py
    feed = data_for_chunks(meter, chunks)  # each model chunk reads every micro-batch
    peak = peak_tflops(cfg)
    profiler = StepProfiler(cfg.profile, run_dir, dist.get_rank())  # profile: a few steps, some ranks
    collector = ManualGC(cfg.manual_gc_interval).start()  # Python's GC at chosen steps only
    try:
        while step < cfg.train_steps:
            step += 1
            profiler.before(step)
            start = time.perf_counter()
            batch_size, num_micro = batches.at(consumed)
            for chunk in ddp:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            try:
                losses = fb(forward_step_func=forward_step, data_iterator=feed, model=ddp.chunks,
                            num_microbatches=num_micro, seq_length=seq_length,
                            micro_batch_size=cfg.micro_batch_size)
            except RuntimeError as exc:
                if non_finite_gradients(exc):
                    raise TrainingDiverged(step, exc, ckpt.latest()) from exc
                raise
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            step_time = time.perf_counter() - start
            profiler.after(step)
            consumed += batch_size
            step_flops = meter.take()
            if is_logger and step == start_step + 1 and (warning := meter.pipeline_warning()):
                logger.warning(warning)
            collector.step(step)
            logged_step = step % cfg.log_interval == 0 or step == cfg.train_steps
            every = cfg.check_weights_across_dp_interval
            check_now, norm_now = bool(every) and step % every == 0, logged_step and cfg.log_params_norm
            if check_now or norm_now:  # both read every weight on every rank (collectives)
                # with overlapped gathering each rank's weights outside its own shard are a step
                # behind until the next forward: bring them up to date once, as a save does
                finish_param_gather(ddp)
            if check_now:
                check_replicas(ddp.chunks, step)
            norm = params_norm(ddp.chunks) if norm_now else None
            if last_stage and logged_step:
                loss = _step_loss(losses, cfg.calculate_per_token_loss)
                lr_new, lr_pre = current_lrs(optimizer, cfg)
                totals = skip_totals(data)
                metrics = {"loss": loss, "lr_new": lr_new, "lr_pretrained": lr_pre,
                           "grad_norm": float(grad_norm), "step_time_s": step_time,
                           "global_batch_size": batch_size,
                           "text_tokens_per_s": batch_size * cfg.data.seq_length / step_time,
                           **throughput_metrics(step_flops, losses, step_time, peak), **meter.pipeline_metrics(),
                           "data_wait_s": meter.last_data_wait_s,
                           "peak_memory_gib": peak_memory_bytes() / 2**30,
                           "checkpoint_held_s": ckpt.held_s - held_logged, **skip_metrics(totals)}
                if norm is not None:
                    metrics["params_norm"] = norm
                held_logged = ckpt.held_s
                tracker.log_metrics(metrics, step)
                log.write(step, metrics)
                if is_logger and totals["skipped"] > skipped_seen:
                    logger.warning("data: %s", describe(totals))
                skipped_seen = totals["skipped"]
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.train_steps):
                scores = evaluate(ddp, cfg, batches.full_num_micro, data_cfg)
                if scores is not None:
                    tracker.log_metrics(scores, step)
                    log.write_eval(step, scores)
                    _plot(log, cfg, run_dir, is_logger)  # the curves so far, to look at mid-run
            if generation is not None and generation.due(step):
                answers = generation(ddp, step, run_dir)  # every rank: a collective
                if last_stage:
                    tracker.log_metrics(answers, step)
                    log.write_generation(step, answers)
                    _plot(log, cfg, run_dir, is_logger)
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                _save(ckpt, step, ddp, model, optimizer, scheduler, data, cfg)
                saved_at = step
            else:
                ckpt.poll()  # with async_save: commit a background write that finished
            limit = cfg.exit_duration_mins
            out_of_time = limit is not None and time.monotonic() - started >= 60 * limit
            if _any_rank(stop.requested is not None or out_of_time):
                if stop.requested is None:  # the signal, or the time limit, may have come to other ranks
                    stop.requested = f"exit_duration_mins={limit:g}" if out_of_time else "another rank's stop"
                status = "KILLED"
                break
        if saved_at != step:
            _save(ckpt, step, ddp, model, optimizer, scheduler, data, cfg)
        ckpt.wait()  # the run's last checkpoint is committed before the run reports done
        if last_stage:
            totals = skip_totals(data)
            if is_logger:
                logger.info("data: %s", describe(totals))
    except KeyboardInterrupt:
        ckpt.abandon()
        tracker.finish("KILLED")
        raise
    except BaseException:
        ckpt.abandon()
        tracker.finish("FAILED")
        raise
    finally:
        profiler.close()  # a run that stopped inside the profiled steps still writes them
        stop.restore()
        collector.stop()
    if _plot(log, cfg, run_dir, is_logger):
        tracker.log_artifact(str(run_dir / "loss.png"))
    if is_logger:
        ended = f"stopped by {stop.requested}" if status == "KILLED" else "done"
        loss_text = f"loss {log.rows[-1]['loss']:.4f}; " if log.rows else ""
        logger.info("%s at step %d: %srun dir %s; checkpoints %s; MLflow %s", ended, step, loss_text, run_dir,
                    ckpt.dir, getattr(tracker, "uri", "off"))
    tracker.finish(status)
    return {"final_loss": log.rows[-1]["loss"] if log.rows else None, "steps": step, "status": status}


def _save(ckpt: Checkpointer, step: int, ddp, model, optimizer, scheduler, data, cfg: TrainConfig) -> None:
    finish_param_gather(ddp)
    ckpt.save(step, model, optimizer, scheduler, data.state_dict(), cfg)
    how = "the shards are written in the background" if cfg.checkpoint.async_save else "committed"
    logger.info("checkpoint iter_%07d: training held %.2f s; %s", step, ckpt.last_save_held_s, how)


def _any_rank(flag: bool) -> bool:
    """Every rank must agree to stop at the same step (a signal may reach ranks at different times)."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

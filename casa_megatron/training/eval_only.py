"""``skip_train=true``: score a checkpoint without training it (Megatron-LM's ``--skip-train``).

Why: a fusion comparison scores finished checkpoints on held-out sets chosen after training (a
new validation split, a benchmark's questions); training a checkpoint further to get one more
evaluation would change it. The checkpoint's config is checked as a resume checks it and the model
is built at this config's TP / PP / DP layout and precision; then, instead of steps:

* **the weights**: the checkpoint the run would resume from (the newest complete one in
  ``checkpoint.dir``, its files checked against the manifest), else ``checkpoint.pretrained``
  (an import, a training checkpoint ``iter_N`` or a run's checkpoint folder). Weights only: no
  optimizer and no gradient buffers are built, so the memory is the model's and the
  trainability fields may differ from the run that saved it;
* **``data.valid``**: the validation loss of ``eval_iters`` global batches, computed as the
  training loop computes it (``evaluation.evaluate``: the same batches, so the same number the
  run logged at that step, at any layout within rounding);
* **``eval_generation.data``**: greedy answers scored as ``casa-eval`` scores them (the same
  tokens as the run's own ``eval_generation`` at that step).

The scores are logged, and written with the answers and the resolved config to
``<run_dir>/evaluations/iter_<N>.json`` (a later evaluation of the same step gets
``iter_<N>-2.json``, ...: nothing is overwritten). With ``tracking.enabled`` they also go to the
MLflow run that trained the checkpoint, at its step (``evaluation/tracking.py``, as
``casa-eval --track`` does; ``valid_loss`` and ``eval/megatron/*``); an import has no such run
and is not tracked. The training run's own files (``config.yaml``, ``metrics.jsonl``,
``loss.png``, checkpoints) are not touched, and the run directory is not locked: a run still
training is scored in its own folder (``training/session.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from casa_megatron.config import to_dict
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.pretrained import resolve_pretrained_dir
from casa_megatron.data.tokenization import check_vocabulary
from casa_megatron.model.build import build_model_chunks
from casa_megatron.parallel.rank0 import on_rank0
from casa_megatron.runtime.atomic import atomic_write_json
from casa_megatron.runtime.logs import promote_rank
from casa_megatron.training.batch_schedule import BatchSchedule
from casa_megatron.training.checkpoint import CHECKPOINT_NAME, CheckpointError, Checkpointer
from casa_megatron.training.evaluation import check_validation, evaluate
from casa_megatron.training.generation_eval import GenerationEval
from casa_megatron.training.pretrained import load_model_weights

logger = logging.getLogger("casa_megatron.train")

RESULTS_DIR = "evaluations"


def _source(cfg, ckpt: Checkpointer) -> Tuple[Path, str]:
    """(the checkpoint to score, ``resume`` | ``pretrained``); before the model is built, so that
    a run with nothing to score stops at once."""
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        return latest, "resume"
    if cfg.checkpoint.pretrained:
        return resolve_pretrained_dir(cfg.checkpoint.pretrained), "pretrained"
    raise ConfigError(f"skip_train=true: no checkpoint to score: {ckpt.dir} holds none"
                      f"{'' if cfg.checkpoint.resume else ' that may be read (checkpoint.resume=false)'} and "
                      "checkpoint.pretrained is not set")


def step_of(path: Path) -> int:
    """The training step of a checkpoint folder (``iter_N``); 0 for an import."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else 0


def _load(model, path: Path, how: str, ckpt: Checkpointer) -> None:
    if how == "resume":  # the files the manifest names, intact (collective)
        problem = ckpt.verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}; score an older one with "
                                  "checkpoint.pretrained=<its iter_N folder>")
    load_model_weights(model, path)


def _results_path(run_dir: Path, step: int) -> Path:
    folder = run_dir / RESULTS_DIR
    path, n = folder / f"iter_{step:07d}.json", 2
    while path.exists():
        path, n = folder / f"iter_{step:07d}-{n}.json", n + 1
    return path


def _locate_run(path: Path, verified: bool):
    """Every rank (locating checks the checkpoint's files collectively, unless ``verified``): where
    the run that trained ``path`` logs, or None (an import, a run without tracking: said why)."""
    from casa_megatron.evaluation.checkpoint_model import NotACheckpoint
    from casa_megatron.evaluation.tracking import NoTrackedRun, locate_run

    try:
        return locate_run(path, verified)
    except (NoTrackedRun, NotACheckpoint) as exc:
        logger.warning("skip_train: the scores are not tracked: %s", exc)
        return None


def _track(location, scores: Dict[str, float]) -> Optional[str]:
    """The logging rank: ``scores`` to the run at ``location``; its id, or None (said why)."""
    from casa_megatron.evaluation.tracking import NoTrackedRun, log_metrics

    try:
        return log_metrics(location, scores)[1]
    except NoTrackedRun as exc:
        logger.warning("skip_train: the scores are not tracked: %s", exc)
        return None


def _sources(cfg, ckpt: Checkpointer) -> List[Tuple[Path, str]]:
    """The checkpoints to score, oldest first: the one a resume would take (``latest``), or every
    finished one in ``checkpoint.dir`` (``skip_train_checkpoints=all``)."""
    if cfg.skip_train_checkpoints != "all":
        return [_source(cfg, ckpt)]
    found = ckpt.candidates()
    if not found:
        raise ConfigError(f"skip_train_checkpoints=all: {ckpt.dir} holds no checkpoint to score")
    return [(path, "resume") for path in reversed(found)]


def _summary(scored: Dict[int, Dict[str, float]]) -> str:
    """One line per step: the validation loss and the overall held-out accuracy, where scored."""
    names = [n for n in ("valid_loss", "eval/megatron/all") if any(n in s for s in scored.values())]
    lines = ["step | " + " | ".join(names)]
    for step, scores in sorted(scored.items()):
        lines.append(f"{step} | " + " | ".join(f"{scores[n]:.4f}" if n in scores else "-" for n in names))
    return "\n".join(lines)


def evaluate_checkpoint(cfg, run_dir: Path, ckpt: Checkpointer) -> dict:
    """Collective over every rank, inside an opened ``RunSession``. Returns ``{"steps": N, "status":
    "EVALUATED", "scores": {...}, "results": path or None, "scored": {step: scores}, "skipped":
    [damaged checkpoints]}`` (``scores`` / ``results``: the newest checkpoint scored)."""
    sources = _sources(cfg, ckpt)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    # the last stage's first rank holds every score (validation is reduced there; the answers are
    # the same on every rank): it logs, writes the file and tracks them
    writer = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
        and dp_rank == 0
    promote_rank(writer or dist.get_rank() == 0)
    on_rank0(lambda: check_vocabulary(cfg.data, cfg.model.lm.vocab_size))
    data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
    num_micro = BatchSchedule(cfg, dp_size, dist.get_rank()).full_num_micro  # the training loop's batches
    if cfg.data.valid:
        check_validation(cfg, data_cfg)  # before the model: an unreadable source fails now
    generation = GenerationEval(cfg).load() if cfg.eval_generation.data else None
    params_dtype = torch.bfloat16 if cfg.precision.bf16 else torch.float32
    model = build_model_chunks(cfg.model, cfg.parallel, cfg.data.image_seq_length, params_dtype, cfg.precision)
    for chunk in model:  # how the schedules normalise the loss (wrap_ddp sets it for training)
        chunk.config.calculate_per_token_loss = cfg.calculate_per_token_loss

    scored: Dict[int, Dict[str, float]] = {}
    skipped: List[str] = []
    # the run that trained them: located once; the checkpoints of one folder are one run's, only the
    # step changes
    location, located = None, not cfg.tracking.enabled
    step, scores, results = 0, {}, None
    for path, how in sources:
        if len(sources) == 1:
            _load(model, path, how, ckpt)  # a damaged one stops the run, naming it
        else:  # every checkpoint of the run: a damaged one is skipped and counted
            problem = ckpt.verify(path)  # collective: every rank takes the same branch
            if problem is not None:
                logger.warning("skip_train: checkpoint %s is damaged (%s): skipped", path, problem)
                skipped.append(path.name)
                continue
            load_model_weights(model, path)
        step = step_of(path)
        if not located:
            # a resumed checkpoint's files were just checked against its manifest (_load, verify)
            location, located = _locate_run(path, verified=how == "resume"), True
        elif location is not None:
            location = dataclasses.replace(location, step=step)
        scores, results = _score(cfg, run_dir, model, path, step, num_micro, data_cfg, generation, writer, location)
        scored[step] = scores
    if not scored:
        raise CheckpointError(f"skip_train_checkpoints=all: every checkpoint in {ckpt.dir} is damaged: {skipped}")
    if len(sources) > 1:
        logger.info("skip_train: %d checkpoints scored%s\n%s", len(scored),
                    f", {len(skipped)} damaged skipped ({', '.join(skipped)})" if skipped else "", _summary(scored))
    dist.barrier()
    return {"steps": step, "status": "EVALUATED", "scores": scores, "results": str(results) if results else None,
            "final_loss": None, "scored": scored, "skipped": skipped}


def _score(cfg, run_dir: Path, model, path: Path, step: int, num_micro: int, data_cfg, generation, writer: bool,
           location) -> Tuple[Dict[str, float], Optional[Path]]:
    """Collective: the loaded model's scores; the writer writes them (and tracks them to
    ``location``, when not None)."""
    logger.info("skip_train: scoring %s (step %d) at TP=%d PP=%d DP=%d", path, step,
                cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                parallel_state.get_data_parallel_world_size())
    scores: Dict[str, float] = {}
    if cfg.data.valid:
        valid = evaluate(model, cfg, num_micro, data_cfg)  # None off the last pipeline stage
        if valid is not None:
            scores.update(valid)
            logger.info("skip_train: %s", ", ".join(f"{k} {v:.4f}" for k, v in valid.items()))
    answers = None
    if generation is not None:
        generated, answers = generation.answer(model.chunks, step)
        scores.update(generated)

    results, run_id = None, None
    if writer:
        results = _results_path(run_dir, step)
        atomic_write_json(results, {"checkpoint": str(path), "step": step, "scores": scores,
                                    "validation": {"data": [str(v) for v in cfg.data.valid],
                                                   "eval_iters": cfg.eval_iters} if cfg.data.valid else None,
                                    "generation": answers, "config": to_dict(cfg)})
        if location is not None:
            run_id = _track(location, scores)
        logger.info("skip_train: scores of %s written to %s%s", path.name, results,
                    f"; logged to MLflow run {run_id} at step {step}" if run_id else "")
    return scores, results

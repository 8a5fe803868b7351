"""Held-out answers by greedy generation during training (``eval_generation``).

The validation loss says how well the model predicts the reference answer token by token; a
fusion comparison reads what the model answers. So every ``eval_generation.interval`` steps (and
at the end) the live model answers the first ``max_samples`` held-out questions and captions
the held-out clips greedily, exactly as ``casa-eval`` does with a checkpoint
(``evaluation/megatron_side.py``: recomputation, the training layout, any TP / PP layout and
the interleaved schedule's chunks, data-parallel replicas splitting the items: each reads and
holds only its share of the held-out samples), and the scores go to ``metrics.jsonl`` (a row
``{"step", "generation": {...}}``), the log and MLflow (``eval/megatron/<group>``, the names
``casa-eval --track`` uses). The items are read once, before step 1: a wrong folder or one
without a usable sample is a config error at start-up, not at the first evaluation.

The model answers in eval mode with its weights brought up to date (overlapped parameter
gathering leaves other shards a step behind); nothing it does touches the training state: the
data order, the RNG and the weights are as before, so the loss curve is the same with or
without these evaluations (tested). What it answered, item by item, is kept as
``<run_dir>/generation/iter_<N>.json`` (``casa-eval``'s ``eval.json`` layout for its megatron side).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch.distributed as dist

from casa_megatron.config.schema import TrainConfig
from casa_megatron.runtime.atomic import atomic_write_json

logger = logging.getLogger(__name__)


class GenerationEval:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.settings = None
        self.held_out = None  # evaluation/shares.HeldOut: this replica's items, the whole set's counts

    def due(self, step: int) -> bool:
        every = self.cfg.eval_generation.interval
        return bool(every) and (step % every == 0 or step == self.cfg.train_steps)

    def load(self) -> "GenerationEval":
        """Collective over the data-parallel group: each replica reads its share of the held-out
        samples (``evaluation/shares.py``)."""
        from casa_megatron.config.errors import ConfigError
        from casa_megatron.data.processor import ProcessorSettings
        from casa_megatron.data.recipe import RecipeError
        from casa_megatron.data.records import ShardError
        from casa_megatron.evaluation.answer_metrics import MetricError
        from casa_megatron.evaluation.shares import read_held_out, replica_share

        g = self.cfg.eval_generation
        settings = ProcessorSettings.from_config(self.cfg.data, "cpu", self.cfg.model.fusion.mechanism)
        self.settings = dataclasses.replace(settings, truncate=False)  # a held-out prompt is never cut
        try:
            self.held_out = read_held_out(g.data, self.settings, g.max_samples, g.media_root or "",
                                          share=replica_share())
        except (OSError, ValueError, ShardError, RecipeError, MetricError) as exc:  # what casa-eval reports too
            raise ConfigError(f"eval_generation.data={g.data!r}: {exc}") from exc
        if self.held_out.empty:
            raise ConfigError(f"eval_generation.data={g.data!r}: no usable held-out sample "
                              f"(skipped: {self.held_out.skipped})")
        return self

    def __call__(self, ddp, step: int, run_dir: Path) -> Dict[str, float]:
        """Collective over every rank, after ``load``. Returns ``eval/megatron/<group>`` -> score;
        the answers go to ``<run_dir>/generation/iter_<step>.json``."""
        from casa_megatron.training.optimizer import finish_param_gather

        finish_param_gather(ddp)
        # the VLMs inside megatron's DDP: its forward pre-hooks are not wanted here
        scores, answers = self.answer([d.module for d in ddp], step)
        if dist.get_rank() == 0:  # every rank holds the same answers (megatron_side shares each token)
            atomic_write_json(run_dir / "generation" / f"iter_{step:07d}.json", answers)
        return scores

    def answer(self, chunks, step: int) -> Tuple[Dict[str, float], dict]:
        """Collective: the model chunks (plain VLMs, weights current) answer every item.
        Returns (``eval/megatron/<group>`` -> score, the answers in ``casa-eval``'s layout)."""
        from casa_megatron.evaluation.answering import decoder, run_replicas
        from casa_megatron.evaluation.megatron_side import greedy_for
        from casa_megatron.evaluation.tracking import metrics_of

        slots, was_training = [c.image_seq_length for c in chunks], chunks[0].training
        for chunk in chunks:
            chunk.eval()
        try:
            runner = greedy_for(chunks, self.cfg, self.settings, self.cfg.eval_generation.max_new_tokens)
            result = run_replicas(runner, self.held_out.items, decoder(runner.tok, runner.stop_ids), progress=False,
                                  batch_size=self.cfg.eval_generation.batch_size)
        finally:
            for chunk, n in zip(chunks, slots):
                chunk.image_seq_length = n
                chunk.train(was_training)
        scores = metrics_of({"sides": {"megatron": result}})
        logger.info("step %5d | generation: %s (%d questions, %d clips, %.1f s)", step,
                    ", ".join(f"{k.split('/', 2)[2]} {v:.3f}" for k, v in sorted(scores.items())),
                    self.held_out.questions, self.held_out.captions, result["seconds"])
        answers = {"data": self.cfg.eval_generation.data, "step": step, "skipped": self.held_out.skipped,
                   "max_new_tokens": self.cfg.eval_generation.max_new_tokens, "sides": {"megatron": result}}
        return scores, answers


def maybe_generation_eval(cfg: TrainConfig) -> Optional[GenerationEval]:
    """The evaluation with its items read (every rank: before step 1), or None."""
    return GenerationEval(cfg).load() if cfg.eval_generation.interval else None

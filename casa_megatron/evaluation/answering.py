"""Answering held-out items with a greedy runner and scoring the answers: shared by ``casa-eval``
(both sides) and the generation evaluation during training (``training/generation_eval.py``).

A runner answers a ``QuestionItem`` with tokens (``answer``; ``answer_batch`` for several at
once) and captions a ``CaptionItem`` frame by frame (``caption``; ``caption_batch`` where it
captions several clips together): ``MegatronGreedy`` (recomputation, any TP / PP layout) or
``HFGreedy`` (the export's cache)."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

from casa_megatron.evaluation.items import Items
from casa_megatron.evaluation.metrics import caption_scores, question_scores


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def decoder(tok, stop_ids):
    """Tokens -> answer text: stop tokens and special tokens dropped, stripped."""
    def text(tokens):
        return tok.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True).strip()
    return text


def answer_all(name: str, runner, items: Items, text, batch_size: int = 1,
               progress: bool = True) -> Tuple[List[Dict], List[Dict]]:
    """(question rows, caption rows) of ``items`` in their order."""
    from tqdm import tqdm

    show = progress and is_rank0()

    def answers():  # (item, tokens), batch_size questions per call where the runner batches
        with tqdm(total=len(items.questions), desc=f"{name}: questions", unit="q", disable=not show) as bar:
            for first in range(0, len(items.questions), batch_size):
                chunk = items.questions[first:first + batch_size]
                tokens = runner.answer_batch(chunk) if batch_size > 1 else [runner.answer(chunk[0])]
                bar.update(len(chunk))
                yield from zip(chunk, tokens)

    questions, captions = [], []
    for item, tokens in answers():
        questions.append({"id": item.id, "type": item.qtype, "task": item.task, "reference": item.reference,
                          "answers": item.answers, "metric": item.metric, "tokens": tokens, "answer": text(tokens)})
    clips = batch_size if hasattr(runner, "caption_batch") else 1
    with tqdm(total=len(items.captions), desc=f"{name}: clips", unit="clip", disable=not show) as bar:
        for first in range(0, len(items.captions), clips):
            chunk = items.captions[first:first + clips]
            for item, frames in zip(chunk, runner.caption_batch(chunk) if clips > 1 else [runner.caption(chunk[0])]):
                captions.append({"id": item.id, "frames": [{"tokens": t, "caption": text(t), "reference": r}
                                                           for t, r in zip(frames, item.references)]})
            bar.update(len(chunk))
    return questions, captions


def scored(questions: List[Dict], captions: List[Dict], seconds: float) -> Dict:
    scores = question_scores((q["type"], q["task"], q["answer"], q["answers"], q["metric"]) for q in questions)
    if captions:
        scores["caption"] = caption_scores((f["caption"], f["reference"]) for c in captions for f in c["frames"])
    return {"questions": questions, "captions": captions, "scores": scores, "seconds": seconds}


def run_side(name: str, runner, items: Items, tok, stop_ids, batch_size: int = 1) -> Dict:
    start = time.perf_counter()
    questions, captions = answer_all(name, runner, items, decoder(tok, stop_ids), batch_size)
    return scored(questions, captions, time.perf_counter() - start)


def run_replicas(runner, items: Items, text, progress: bool = True, batch_size: int = 1) -> Dict:
    """The megatron side over its data-parallel replicas (one without), ``batch_size`` questions
    (and clips) per generation; every rank gets every answer back in the samples' order.

    Replica r of D answers the items of samples r, r + D, ...: ``items`` is that share
    (``read_items(part=(r, D))``, ``evaluation/shares.py``: the evaluation during training, the
    ranks of ``casa-eval``) or the whole set (``casa-eval``'s rank 0 with ``--hf``, one process),
    which it is taken from. The answers merge by sample index and turn."""
    from megatron.core import parallel_state

    from casa_megatron.evaluation.shares import gathered_over_replicas

    start = time.perf_counter()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if items.part == (0, 1):
        share = Items([q for q in items.questions if q.order % dp == rank],
                      [c for c in items.captions if c.order % dp == rank], items.skipped)
    elif items.part == (rank, dp):
        share = items
    else:
        raise ValueError(f"items of share {items.part} on data-parallel rank {rank} of {dp}")
    questions, captions = answer_all("megatron", runner, share, text, batch_size, progress=progress)
    mine = (list(zip([(q.order, q.turn) for q in share.questions], questions)),
            list(zip([c.order for c in share.captions], captions)))
    shards = gathered_over_replicas(mine)
    questions = [row for _, row in sorted((pair for shard in shards for pair in shard[0]), key=lambda p: p[0])]
    captions = [row for _, row in sorted((pair for shard in shards for pair in shard[1]), key=lambda p: p[0])]
    return scored(questions, captions, time.perf_counter() - start)

"""Scores: exact-match accuracy of answers per question group, token F1 of streamed captions.

Answers are compared after normalisation (lower case, punctuation and articles kept as words
except trailing ``.``/``!``/``?``, whitespace collapsed): the generated dataset's answers are one
or two words (``red``, ``the first``), so exact match is the right accuracy, as in VQA-style
benchmarks.

Captions use **token F1** (SQuAD's bag-of-words F1 between the generated and the reference
caption of a frame), averaged over the frames that have a reference; frames without one score
**silence accuracy** (the model said nothing, as it was trained to). Why not BLEU: the reference
captions are templated 9-word sentences ("the red circle moves right and is at the left") whose
information sits in four content words; F1 gives partial credit per correct attribute and does
not care about order, whereas sentence-level 4-gram BLEU is 0 for most partially right captions
and very noisy on 9 words. Exact match of the whole caption is reported beside it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Tuple


_REASONING = re.compile(r"^\s*<think>.*?</think>", re.S)


def final_answer(prediction: str) -> str:
    """The answer after a leading reasoning block: Qwen3-style models open their answer with
    ``<think>...</think>`` (empty when not thinking, as a Qwen3 chat template trains the last
    turn); the block is not part of the answer (lmms-eval strips it too). An unclosed block is
    left as it is (and scores as a wrong answer)."""
    return _REASONING.sub("", prediction, count=1).strip()


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return re.sub(r"\s*[.!?]+$", "", text)


def exact(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def question_scores(rows: Iterable[Tuple[str, str, str, List[str], str]]) -> Dict[str, Dict[str, float]]:
    """rows (type, task, prediction, answers, metric) -> {group: {n, accuracy}} for ``all``, every
    type and every task (``task:<name>``), each question scored by its metric
    (``answer_metrics.py``: exact match for the generated dataset); with any metric other than
    ``exact``, also per metric (``metric:<name>``)."""
    from casa_megatron.evaluation.answer_metrics import score

    groups: Dict[str, List[float]] = defaultdict(list)
    rows = list(rows)
    by_metric = any(metric != "exact" for *_, metric in rows)
    for qtype, task, pred, answers, metric in rows:
        value = score(metric, final_answer(pred), answers)
        for g in ("all", qtype, f"task:{task}") + ((f"metric:{metric}",) if by_metric else ()):
            groups[g].append(value)
    return {g: {"n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(groups.items())}


def caption_scores(frames: Iterable[Tuple[str, str]]) -> Dict[str, float]:
    """(generated, reference) per frame -> caption_f1, caption_exact (frames with a reference),
    silence_accuracy (frames without one), and the counts."""
    f1, ex, silent = [], [], []
    for pred, ref in frames:
        if normalize(ref):
            f1.append(token_f1(pred, ref))
            ex.append(exact(pred, ref))
        else:
            silent.append(float(not normalize(pred)))
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"frames_with_reference": len(f1), "caption_f1": mean(f1), "caption_exact": mean(ex),
            "frames_without_reference": len(silent), "silence_accuracy": mean(silent)}

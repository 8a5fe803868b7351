"""The answer scores of the public VQA benchmarks a VLM is compared on, one per ``metric`` name.

A held-out question may carry several acceptable answers (``answers``: VQAv2 / TextVQA / VizWiz
give ten human answers, DocVQA several spellings) and the benchmark's metric (``metric``); each
function scores one prediction against them in [0, 1]:

``exact``    exact match after ``metrics.normalize`` against any answer (the default, and what the
             generated dataset's one- or two-word answers need).
``vqa``      VQA accuracy (VQAv2, TextVQA, VizWiz, OK-VQA): the answers and the prediction are
             normalised as the VQA challenge's evaluation does (punctuation, periods, number words
             to digits, articles, apostrophe-less contractions), then averaged over the answers
             left out in turn: ``mean_i min(1, #{j != i: answer_j == prediction} / 3)``, so a
             prediction three or more of ten annotators gave scores 1. Unlike the challenge's
             script (and like lmms-eval), the normalisation applies even when all answers agree.
``anls``     Average Normalised Levenshtein Similarity (DocVQA, InfoVQA): the best over the answers of
             ``1 - lev(p, a) / max(|p|, |a|)`` on lower-cased, whitespace-collapsed text, 0 where the
             normalised distance is 0.5 or more.
``relaxed``  ChartQA's relaxed accuracy: numbers (a trailing ``%`` divides by 100) within 5 % of an
             answer, other text equal ignoring case.
``choice``   multiple choice (AI2D, ScienceQA, MMMU, MMBench): the option letter the prediction
             gives (``B``, ``(B)``, ``B. text``, or after "answer is") equals the answer's.

Why the metric travels with the data: a mixed held-out set (the paper's evaluation suite) scores
every question by its own benchmark's rule in one ``casa-eval`` run.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence

from casa_megatron.evaluation.metrics import normalize

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


class MetricError(Exception):
    """A question's ``metric`` / ``answers`` that cannot be scored: an unknown metric (a typo would
    score every question 0) or too few answers for it. Not a ValueError: it stops the evaluation,
    naming the sample, rather than skipping every question of a benchmark one by one."""


# --- VQA normalisation (the VQA challenge's answer processing, written from its description) ----------
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (what the challenge's pattern does)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# contractions as annotators typed them without the apostrophe -> with it (one spelling per answer)
_CONTRACTED = ["ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't",
               "hasn't", "haven't", "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm",
               "i've", "isn't", "it'd", "it'll", "let's", "ma'am", "mightn't", "might've", "mustn't", "must've",
               "needn't", "o'clock", "oughtn't", "shan't", "she'd", "she'll", "should've", "shouldn't",
               "that'd", "that's", "there'd", "there're", "there's", "they'd", "they'll", "they're", "they've",
               "wasn't", "we'd", "we'll", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've",
               "when's", "where'd", "where's", "where've", "who'd", "who'll", "who's", "who've", "why'll",
               "why're", "why's", "won't", "would've", "wouldn't", "y'all", "you'd", "you'll", "you're",
               "you've"]
# "hed", "shed", "well", "were", "its", "lets", "cant" ... : only those that are not words themselves
_CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTED
                 if c.replace("'", "") not in {"hell", "shell", "well", "were", "wed", "id", "its", "lets", "shed",
                                               "ill", "whore"}}


def vqa_normalize(text: str) -> str:
    """An answer as the VQA challenge compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    strip_marks = bool(_COMMA_IN_NUMBER.search(text))
    out = text
    for mark in _PUNCTUATION:  # next to a space (or in a text with 1,000-style numbers): removed; else a space
        out = out.replace(mark, "" if (f"{mark} " in text or f" {mark}" in text or strip_marks) else " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    pred = vqa_normalize(prediction)
    given = [vqa_normalize(a) for a in answers]
    return sum(min(1.0, sum(g == pred for j, g in enumerate(given) if j != i) / 3) for i in range(len(given))) \
        / len(given)


# --- ANLS -----------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: Sequence[str]) -> float:
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        ans = " ".join(answer.lower().split())
        longest = max(len(pred), len(ans))
        distance = levenshtein(pred, ans) / longest if longest else 0.0
        best = max(best, 1 - distance if distance < ANLS_THRESHOLD else 0.0)
    return best


# --- relaxed accuracy -----------------------------------------------------------------------------------
def _number(text: str) -> Optional[float]:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    pred = _number(prediction)
    for answer in answers:
        target = _number(answer)
        if pred is not None and target:  # a zero target is compared as text, as ChartQA's own code does
            if abs(pred - target) / abs(target) <= RELAXED_TOLERANCE:
                return 1.0
        elif prediction.strip().lower() == answer.strip().lower():
            return 1.0
    return 0.0


# --- multiple choice ------------------------------------------------------------------------------------
# "B", "(B)", "(B) text", "B.", "B. text", "B) text", "B: text"; not "A cat" or "I think" (words)
_LETTER_ALONE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:\s*$|[.:)]))")
_LETTER_SAID = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b\)?", re.IGNORECASE)


def choice_letter(text: str) -> Optional[str]:
    """The option letter a prediction gives: at its start ("B", "(B)", "B. the cat", not the word
    "A" of "A cat"), else after "answer is" / "option" / "choice"; None when it names none."""
    match = _LETTER_ALONE.match(text)
    if match:
        return match.group(1) or match.group(2)
    match = _LETTER_SAID.search(text)
    return match.group(1).upper() if match else None


def choice_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Multiple choice (AI2D, ScienceQA, MMMU, MMBench as lmms-eval prompts them: "Answer with
    the option's letter"): the prediction's letter equals an answer's letter."""
    letter = choice_letter(prediction)
    return float(letter is not None and any(letter == (choice_letter(a) or a.strip().upper()) for a in answers))


def exact_any(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))


METRICS: Dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact": exact_any, "vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy, "choice": choice_accuracy}


def check(metric: object, answers: Sequence[str], where: str) -> str:
    """``metric`` if it can score ``answers``, else ``MetricError`` naming ``where``."""
    if metric not in METRICS:
        raise MetricError(f"{where}: metric {metric!r} is not one of {sorted(METRICS)}")
    if metric == "vqa" and len(answers) < 2:
        raise MetricError(f"{where}: metric 'vqa' averages over the annotators' answers and needs 2 or more "
                          f"(VQAv2 gives 10), got {list(answers)}; with one reference answer use 'exact'")
    return metric


def score(metric: str, prediction: str, answers: List[str]) -> float:
    return METRICS[metric](prediction, answers)

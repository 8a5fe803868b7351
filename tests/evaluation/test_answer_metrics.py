"""evaluation/answer_metrics.py: the benchmark metrics on cases worked out by hand from their
definitions, Levenshtein against a naive recursion, and how a held-out sample names its answers
and metric (evaluation/items.py)."""

from __future__ import annotations

import functools
import json
import random

import pytest

from casa_megatron.evaluation.answer_metrics import (MetricError, anls, choice_accuracy, choice_letter, exact_any,
                                                     levenshtein, relaxed_accuracy, vqa_accuracy, vqa_normalize)
from casa_megatron.evaluation.items import _questions
from casa_megatron.data.formats import parse_conversation


def test_vqa_normalisation():
    cases = {
        "Two dogs.": "2 dogs",  # number word, final period
        "The cat's toy": "cat's toy",  # article dropped, apostrophe kept
        "1,000": "1000",  # a comma inside a number: every mark removed
        "yes!": "yes",
        "dont": "don't",  # typed without its apostrophe
        "well": "well",  # a word, not a contraction
        "3.5 m": "3.5 m",  # a decimal point stays
        "red/blue": "red blue",  # a mark between words: a space
        "red / blue": "red blue",  # next to a space: removed
        "  An\tapple\n": "apple",
        "none": "0",
    }
    assert {text: vqa_normalize(text) for text in cases} == cases


def test_vqa_accuracy_averages_over_the_answer_left_out():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("3.", answers) == 1.0  # 7 annotators: 1 whichever is left out
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("yes", ["yes", "yes"] + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6


def test_levenshtein_equals_the_naive_recursion():
    @functools.lru_cache(maxsize=None)
    def naive(a, b):
        if not a or not b:
            return len(a) + len(b)
        return min(naive(a[1:], b) + 1, naive(a, b[1:]) + 1, naive(a[1:], b[1:]) + (a[0] != b[0]))

    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randrange(7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randrange(7)))
        assert levenshtein(a, b) == naive(a, b), (a, b)


def test_anls():
    assert anls(" UCSF ", ["ucsf"]) == 1.0
    assert anls("ucsd", ["ucsf"]) == 0.75  # 1 edit in 4 characters
    assert anls("ucla", ["ucsf"]) == 0.0  # 2 of 4: at the 0.5 threshold, no credit
    assert anls("ucsd", ["university of california", "ucsf"]) == 0.75  # the best answer counts
    assert anls("", [""]) == 1.0


def test_relaxed_accuracy():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0  # 4 % off
    assert relaxed_accuracy("10.6", ["10"]) == 0.0  # 6 % off
    assert relaxed_accuracy("25%", ["0.25"]) == 1.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0 and relaxed_accuracy("ten", ["10"]) == 0.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0  # zero: as text
    assert exact_any("The first.", ["the second", "the first"]) == 1.0


def test_choice_reads_the_option_letter():
    said = {"B": "B", "(B)": "B", "(B) a whale": "B", "B. a whale": "B", "B) x": "B", "B:x": "B", " C ": "C",
            "The answer is C.": "C", "answer: (d)": "D", "option b": "B",
            "A cat is here": None, "I think so": None, "Because": None, "": None}
    assert {text: choice_letter(text) for text in said} == said
    assert choice_accuracy("(C) blue", ["C"]) == 1.0 and choice_accuracy("C", ["B"]) == 0.0
    assert choice_accuracy("A cat", ["A"]) == 0.0  # a word, not a letter: no credit
    assert choice_accuracy("B", ["(B)"]) == 1.0


def _items(obj):
    conv = parse_conversation(obj, "k")
    return _questions("k", obj, conv.messages, [], 0)


def test_a_sample_names_its_answers_and_metric():
    llava = {"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}],
             "answers": ["2", "two", 3], "metric": "vqa"}
    item, = _items(llava)
    assert (item.reference, item.answers, item.metric) == ("2", ["2", "two", "3"], "vqa")
    two_turns = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "a"},
                                   {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "b"}],
                 "answers": [["a", "A"], ["b"]], "metric": "anls"}
    assert [(i.answers, i.metric) for i in _items(two_turns)] == [(["a", "A"], "anls"), (["b"], "anls")]
    ours = {"conversation": [{"question": "q", "answer": "7", "answers": ["7", "7.0"], "metric": "relaxed"},
                             {"question": "r", "answer": "red"}]}
    assert [(i.answers, i.metric) for i in _items(ours)] == [(["7", "7.0"], "relaxed"), (["red"], "exact")]


@pytest.mark.parametrize("change, message", [
    ({"metric": "vqa_acc"}, "metric 'vqa_acc' is not one of"),
    ({"metric": "vqa", "answers": ["2"]}, "needs 2 or more"),
    ({"answers": "2"}, "must be a non-empty list of strings"),
    ({"answers": [["a"], ["b"]]}, "holds 2 lists for 1 answers"),
])
def test_answers_or_metric_that_cannot_be_scored_are_named(change, message):
    sample = {"id": "q17", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]}
    with pytest.raises(MetricError, match=message) as err:
        _items(json.loads(json.dumps({**sample, **change})))
    assert "sample 'k', answer 1" in str(err.value)


def test_a_leading_reasoning_block_is_not_part_of_the_answer():
    from casa_megatron.evaluation.metrics import final_answer, question_scores

    assert final_answer("<think>\n\n</think>\n\nred") == "red"  # a Qwen3-style final turn
    assert final_answer(" <think>the shape is red</think> Red.") == "Red."
    assert final_answer("<think>unfinished red") == "<think>unfinished red"  # unclosed: kept, and wrong
    assert final_answer("red <think>x</think>") == "red <think>x</think>"  # only a leading block
    rows = [("colour", "t", "<think>\n\n</think>\n\nred", ["red"], "exact"),
            ("colour", "t", "<think>red</think>blue", ["red"], "exact"),
            ("colour", "t", "<think>red", ["red"], "exact")]
    assert question_scores(rows)["all"] == {"n": 3, "accuracy": 1 / 3}

"""Held-out samples -> evaluation items: questions (each assistant turn of a conversation) and
streamed video captions, with their media decoded once by the training pipeline's own code.

A question's prompt is the conversation up to its user turn, earlier assistant turns as the
dataset gives them (teacher forcing, as every VQA benchmark scores a turn). Its group is the
turn's ``type`` (``coarse`` / ``fine`` in the generated dataset) and ``task`` (``shape``,
``colour``, ``count``, ``number``, ``word``, ``chart``, the two-image ``more`` / ``same_colour``),
read from the turn in our format and from the sample otherwise; likewise its acceptable
``answers`` and the benchmark ``metric`` that scores it (``answer_metrics.py``). A caption item is a clip with
timestamped captions: every sampled frame and the captions that follow it (docs/data.md), the
live captioner's protocol.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from casa_megatron.data.chat_template import DecodedMedia
from casa_megatron.data.conversation import Media, Message
from casa_megatron.data.formats import parse_conversation, sample_annotation
from casa_megatron.data.interleave import captions_per_frame
from casa_megatron.data.processor import ProcessorSettings, SampleProcessor
from casa_megatron.data.records import SampleError
from casa_megatron.data.sources import open_sources
from casa_megatron.evaluation.answer_metrics import MetricError, check


@dataclass
class QuestionItem:
    key: str
    turn: int  # index of the answered assistant turn among the sample's assistant turns
    messages: List[Message]  # the prompt: up to (and including) the question's user turn
    media: List[DecodedMedia]  # the prompt's media parts, in order
    reference: str
    qtype: str
    task: str
    answers: List[str] = field(default_factory=list)  # every acceptable answer (default: [reference])
    metric: str = "exact"  # how the answer is scored (evaluation/answer_metrics.py)
    order: int = 0  # its sample's index among the source's samples (items of a share merge by it)

    @property
    def id(self) -> str:
        return f"{self.key}#{self.turn}"


@dataclass
class CaptionItem:
    key: str
    prompt: str
    frames: List[Tensor]  # [3, H, W] uint8 each
    times: List[float]
    references: List[str]  # per frame: the captions that follow it ("" when none)
    qtype: str = "caption"
    task: str = "caption"
    order: int = 0  # its sample's index among the source's samples

    @property
    def id(self) -> str:
        return self.key


@dataclass
class Items:
    questions: List[QuestionItem] = field(default_factory=list)
    captions: List[CaptionItem] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> count
    part: Tuple[int, int] = (0, 1)  # (k, n): the samples k, k + n, ... of the source (n = 1: all)


def _turn_meta(obj: dict, turn: int) -> Tuple[str, str]:
    """(type, task) of the ``turn``-th answer: from the turn (our format), else the sample."""
    turns = obj.get("conversation") if isinstance(obj.get("conversation"), list) else []
    own = turns[turn] if turn < len(turns) and isinstance(turns[turn], dict) else {}
    qtype = str(own.get("type") or obj.get("type") or "unknown")
    return qtype, str(own.get("task") or obj.get("task") or qtype)


def _turn_scoring(key: str, obj: dict, turn: int, turns: int, reference: str) -> Tuple[List[str], str]:
    """(answers, metric) of the ``turn``-th of ``turns`` answers: ``answers`` / ``metric`` of the
    turn (our format), else of the sample, where ``answers`` is a list of strings for a sample with
    one answer or one such list per answer; default ``[reference]``, ``exact``."""
    conversation = obj.get("conversation") if isinstance(obj.get("conversation"), list) else []
    own = conversation[turn] if turn < len(conversation) and isinstance(conversation[turn], dict) else {}
    where = f"sample {key!r}, answer {turn + 1}"
    if "answers" in own:
        answers = own["answers"]
    elif "answers" in obj:
        answers = obj["answers"]
        if isinstance(answers, list) and answers and all(isinstance(a, list) for a in answers):
            if len(answers) != turns:
                raise MetricError(f"{where}: 'answers' holds {len(answers)} lists for {turns} answers")
            answers = answers[turn]
        elif turns > 1:
            raise MetricError(f"{where}: the sample has {turns} answers; give 'answers' as one list per answer")
    else:
        answers = [reference]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) and
                                                               not isinstance(a, bool) for a in answers):
        raise MetricError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    answers = [str(a) for a in answers]
    return answers, check(own.get("metric", obj.get("metric", "exact")), answers, where)


def _questions(key: str, obj: dict, messages: List[Message], media: List[DecodedMedia],
               order: int = 0) -> List[QuestionItem]:
    out, used, turn = [], 0, 0
    turns = sum(m.role == "assistant" for m in messages)
    for i, m in enumerate(messages):
        if m.role == "assistant":
            qtype, task = _turn_meta(obj, turn)
            reference = m.text().strip()
            answers, metric = _turn_scoring(key, obj, turn, turns, reference)
            out.append(QuestionItem(key, turn, list(messages[:i]), media[:used], reference, qtype, task, answers,
                                    metric, order))
            turn += 1
        used += sum(isinstance(p, Media) for p in m.content)
    return out


def read_items(path: str, settings: ProcessorSettings, max_samples: Optional[int] = None,
               media_root: str = "", part: Tuple[int, int] = (0, 1)) -> Items:
    """Every sample of the source at ``path`` (first ``max_samples``), decoded with ``settings``
    (pixel budgets, fps, max_frames: those of training). Bad samples are skipped and counted.
    A data recipe (``data/recipe.py``) gives its datasets' selected samples, one after the other.
    ``part = (k, n)``: only the samples k, k + n, k + 2n, ... of those (a data-parallel replica's
    share: ``answering.run_replicas`` merges the shares back in the samples' order)."""
    from tqdm import tqdm

    from casa_megatron.data.sources import SourceSpec

    _, sources = open_sources([SourceSpec(str(path), media_root=media_root)])
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"part {part}: not a share (k, n) with 0 <= k < n")
    samples = list(enumerate([(source, i) for source in sources for i in range(len(source))][:max_samples]))[k::n]
    processor = SampleProcessor(settings, with_layout=False)
    items, skipped = Items(part=(k, n)), Counter()
    for order, (source, i) in tqdm(samples, desc="reading held-out samples", unit="sample"):
        try:
            raw = source.read(i)
            obj = sample_annotation(raw)  # the .json part, or an image-text pair's .txt
            conv = parse_conversation(obj, raw.key, settings.qa_windows)
            media = processor.decode_media(raw, conv)
        except SampleError as e:
            skipped[e.reason] += 1
            continue
        except (KeyError, ValueError):
            skipped["bad_annotation"] += 1
            continue
        if conv.captions:
            clip = media[0]
            texts = captions_per_frame(conv.captions, clip.times, settings.fps)
            items.captions.append(CaptionItem(raw.key, conv.messages[0].text(), list(clip.frames),
                                              list(clip.times), [" ".join(t) for t in texts], order=order))
        else:
            items.questions += _questions(raw.key, obj, conv.messages, media, order)
    items.skipped = dict(skipped)
    return items

"""The ``<key>.json`` of a sample: a conversation or timestamped captions, validated once.

Accepted shapes (extra fields are kept in ``meta``):
    {"conversation": [{"question": str, "answer": str, "type"?: str}, ...], "type"?: str}
    {"captions": [{"t": seconds, "text": str}, ...], "type"?: str}
A conversation may go with an image or a video (a video is then one clip window); captions go
with a video (each caption follows the frame sampled at or before its timestamp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from casa_megatron.data.records import SampleError


@dataclass
class Turn:
    question: str
    answer: str
    qtype: Optional[str] = None


@dataclass
class Caption:
    t: float
    text: str
    # False: what is on screen at t -> the frame sampled at or before t (our captions).
    # True: speech that has been heard by t (ASR words, t = the word's end) -> the first frame
    # sampled at or after t, so nothing is predicted before it is said (LiveCC's convention).
    heard: bool = False


@dataclass
class Annotation:
    turns: List[Turn] = field(default_factory=list)
    captions: List[Caption] = field(default_factory=list)  # sorted by t
    qtype: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def _bad(key: str, message: str) -> SampleError:
    return SampleError("bad_annotation", f"{key}: {message}")


def parse_annotation(data: bytes | str | dict, key: str = "?") -> Annotation:
    if isinstance(data, dict):
        obj = data
    else:
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(key, f"annotation is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise _bad(key, f"annotation must be a JSON object, got {type(obj).__name__}")
    qtype = obj.get("type")
    turns, captions = [], []
    for i, turn in enumerate(obj.get("conversation") or []):
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str) \
                or not isinstance(turn.get("answer"), str):
            raise _bad(key, f"conversation[{i}] needs string 'question' and 'answer'")
        if not turn["answer"].strip():
            raise SampleError("empty_turn", f"{key}: conversation[{i}] has an empty answer")
        turns.append(Turn(turn["question"], turn["answer"], turn.get("type", qtype)))
    for i, cap in enumerate(obj.get("captions") or []):
        if not isinstance(cap, dict) or not isinstance(cap.get("text"), str) \
                or not isinstance(cap.get("t"), (int, float)) or cap["t"] < 0:
            raise _bad(key, f"captions[{i}] needs a number 't' >= 0 and a string 'text'")
        captions.append(Caption(float(cap["t"]), cap["text"]))
    if not turns and not captions:
        raise _bad(key, "annotation has neither a 'conversation' nor 'captions'")
    if turns and captions:
        raise _bad(key, "annotation has both a 'conversation' and 'captions'; use one")
    captions.sort(key=lambda c: c.t)
    meta = {k: v for k, v in obj.items() if k not in ("conversation", "captions")}
    return Annotation(turns, captions, qtype if qtype is not None else (turns[0].qtype if turns else None), meta)

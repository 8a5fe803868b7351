"""The one in-memory form every annotation format is parsed into (``formats.py``).

A sample is a list of chat messages whose content interleaves text and media references, plus,
for streaming video, timestamped captions. Both text layouts (the tokenizer's chat template,
``chat_template.py``, and our own layout tokens, ``interleave.py``) start from it, so a sample
gives the same packed batch whatever format it was stored in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from casa_megatron.data.annotations import Caption

ROLES = ("system", "user", "assistant")


@dataclass
class Media:
    """A reference to one image or video of the sample.

    ``source`` is the path as written in the annotation (JSON datasets resolve it against their
    ``media_root``); ``None`` means "the next media part of the sample" (tar shards: ``key.0.jpg``,
    ``key.1.jpg``, ... in index order). ``kind`` is ``None`` when the annotation does not say
    (our own format): the file extension decides.
    """

    kind: Optional[str] = None  # image | video | None
    source: Optional[str] = None
    # a clip of a longer video (LiveCC's video_start / video_end), seconds; frame times stay
    # absolute (video time), as the captions' times are
    start: Optional[float] = None
    end: Optional[float] = None


Part = Union[str, Media]


@dataclass
class Message:
    role: str  # system | user | assistant
    content: List[Part]

    def text(self) -> str:
        return "".join(p for p in self.content if isinstance(p, str))


@dataclass
class Conversation:
    """``messages`` (a chat), or ``captions`` of the video in ``messages``' first media part."""

    messages: List[Message]
    captions: List[Caption] = field(default_factory=list)  # sorted by t
    qtype: Optional[str] = None  # coarse | fine | ... (carried to SampleInfo for benchmarks)
    meta: Dict[str, Any] = field(default_factory=dict)
    format: str = "ours"

    @property
    def media(self) -> List[Media]:
        """Every media reference in stream order."""
        return [p for m in self.messages for p in m.content if isinstance(p, Media)]


def media_groups(content: List[Part]) -> List[List[int]]:
    """Indices (into ``content``) of media parts that are consecutive: nothing but whitespace
    between them. A group is what the paper calls consecutive images: one CASA window."""
    groups: List[List[int]] = []
    previous_media = False
    for i, part in enumerate(content):
        if isinstance(part, Media):
            if previous_media:
                groups[-1].append(i)
            else:
                groups.append([i])
            previous_media = True
        elif part.strip():
            previous_media = False
    return groups

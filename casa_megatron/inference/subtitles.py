"""Live captions as subtitles: SubRip (``captions.srt``) and WebVTT (``captions.vtt``), which
video players and browsers overlay on the video, to see the captions where they belong.

A frame's caption describes what is on screen from its time until the next captioned frame's
(the last one: for one frame interval); frames whose caption is empty (the model stayed silent)
get no cue. Blank lines would end a cue early, and ``-->`` inside a cue breaks WebVTT: both are
taken out of the text.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple

Cue = Tuple[float, float, str]  # start s, end s, text


def cues(times: Sequence[float], captions: Sequence[str], interval: float) -> List[Cue]:
    """``times``: the captioned frames' times in order; ``interval``: the last cue's length."""
    out = []
    for k, (start, text) in enumerate(zip(times, captions)):
        text = re.sub(r"\n\s*\n+", "\n", text.replace("-->", "->")).strip()
        if text:
            end = times[k + 1] if k + 1 < len(times) else start + interval
            out.append((start, end, text))
    return out


def _stamp(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def srt(items: Sequence[Cue]) -> str:
    return "".join(f"{n}\n{_stamp(a, ',')} --> {_stamp(b, ',')}\n{text}\n\n" for n, (a, b, text) in enumerate(items, 1))


def vtt(items: Sequence[Cue]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(a, '.')} --> {_stamp(b, '.')}\n{text}\n\n" for a, b, text in items)

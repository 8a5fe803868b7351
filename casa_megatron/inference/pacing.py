"""Frames delivered at the pace of a live camera: can this model caption live on this machine?

A file is decoded as fast as the machine can, so ``casa-stream`` alone says how long each turn
takes, not whether a live captioner keeps up. With ``--realtime`` frame k (video time ``t_k``)
arrives at wall time ``t_k`` after the start; when the captioner asks for its next frame it gets
the newest one that has arrived (waiting for it if none has) and the older ones it missed are
dropped, as a live captioner has to (a caption of a stale frame is worth less than none). Per
frame the report then has its **lag** (when its caption was done, minus when the frame arrived),
and the run the frames dropped: a model keeps up when nothing is dropped and the lag stays under
one frame interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Tuple

import torch


@dataclass
class PacingStats:
    start: float = 0.0  # clock value at which video time 0 arrived
    dropped: List[float] = field(default_factory=list)  # video times of the frames skipped


def realtime(frames: Iterable[Tuple[float, torch.Tensor]], stats: PacingStats,
             clock: Callable[[], float] = time.perf_counter,
             sleep: Callable[[float], None] = time.sleep) -> Iterator[Tuple[float, torch.Tensor]]:
    """``frames`` (in time order) as a live source delivers them to a consumer that takes each
    next frame when it is done with the last: the newest arrived, older unconsumed ones dropped
    (``stats.dropped``)."""
    it = iter(frames)
    ahead = next(it, None)  # the next frame not yet delivered
    stats.start = clock()
    while ahead is not None:
        wait = ahead[0] - (clock() - stats.start)
        if wait > 0:
            sleep(wait)  # nothing newer has arrived: wait for this one
        newest, ahead = ahead, next(it, None)
        while ahead is not None and ahead[0] <= clock() - stats.start:  # arrived while we were busy
            stats.dropped.append(newest[0])
            newest, ahead = ahead, next(it, None)
        yield newest

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

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch


@dataclass
class PacingStats:
    start: float = 0.0  # clock value at which video time 0 arrived (``live``: reading started)
    dropped: List[float] = field(default_factory=list)  # video times of the frames skipped
    arrived: Dict[float, float] = field(default_factory=dict)  # video time -> clock value it arrived at


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
        stats.arrived[newest[0]] = stats.start + newest[0]
        yield newest


def live(frames: Iterable[Tuple[float, torch.Tensor]], stats: PacingStats,
         clock: Callable[[], float] = time.perf_counter) -> Iterator[Tuple[float, torch.Tensor]]:
    """``frames`` of a live source (``frames.is_live``), read on a thread of their own as they
    come, so that the source is drained while the consumer captions (a pipe or socket left unread
    stalls its sender or loses packets): the consumer gets the newest frame that arrived, waiting
    for one if none has, and a frame replaced before it was taken is dropped
    (``stats.dropped``). At most one frame waits, whatever the consumer's pace. A decoding error
    reaches the consumer after the frames that arrived before it."""
    cond = threading.Condition()
    state = {"waiting": None, "done": False, "error": None}
    stop = threading.Event()

    def read() -> None:
        try:
            for t, frame in frames:
                with cond:
                    stats.arrived[t] = clock()
                    if state["waiting"] is not None:
                        stats.dropped.append(state["waiting"][0])
                    state["waiting"] = (t, frame)
                    cond.notify()
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            state["error"] = e
        finally:
            with cond:
                state["done"] = True
                cond.notify()

    stats.start = clock()
    threading.Thread(target=read, name="casa-live-source", daemon=True).start()
    try:
        while True:
            with cond:
                cond.wait_for(lambda: state["waiting"] is not None or state["done"])
                newest, state["waiting"] = state["waiting"], None
                if newest is None:
                    if state["error"] is not None:
                        raise state["error"]
                    return
            yield newest
    finally:
        stop.set()  # the reader stops at its next frame (a source that never sends one: a daemon thread)

"""Checkpoint writes in the background (``checkpoint.async_save``; Megatron-LM's ``--async-save``).

Why: a synchronous save holds every rank until the last byte of the model and optimizer shards
is on disk (tens of GB at the paper's scale with fp32 master weights and Adam moments). With
``async_save`` the loop is held only while the state is staged; the shards are then written
by a forked process per rank (megatron's ``TemporalAsyncCaller``) while training goes on:

* on a GPU, megatron copies every tensor to host memory before it forks (its ``preload_fn``);
* on the CPU the tensors already live in host memory, and the fork itself is the snapshot: the
  child sees the pages as they were at the fork (copy-on-write), however the parent's optimizer
  changes the weights afterwards (tested: tests/training/test_async_save.py, with a writer held
  back until later steps ran).

The checkpoint stays ``iter_N.tmp`` until every rank's writer has finished; the ranks learn that
together (one all-reduce of a flag per training step, ``poll``), and then the checkpoint is
committed exactly as a synchronous save commits it (manifest, rename, ``latest``, pruning:
``Checkpointer._commit``). A run killed while a write is in flight therefore resumes from the
previous checkpoint, which nothing touched. A failed write (a full disk, a killed writer) raises
on every rank at the commit, naming the checkpoint, and nothing is renamed.

At most one save is in flight: a save requested while the previous one still writes waits for
it, as in Megatron-LM. The data position, RNG states, scheduler and config are small and written
synchronously before the fork; only the sharded model and optimizer go to the background.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest, _disable_gc
from torch.distributed.checkpoint.api import CheckpointException

from casa_megatron.training.ckpt_manifest import describe, shards_of
from casa_megatron.training.failures import RunFailed

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def results_queue(background: bool) -> Iterator[None]:
    """The queue megatron's shard writer reports its results through, for one save.

    megatron creates it lazily with ``multiprocessing.get_context("spawn").Manager()``: a fresh
    interpreter that re-imports the training script, torch and megatron (184 s on the first
    CPU save). A synchronous save reports from the saving process itself, so an in-process
    ``queue.Queue`` is exact. A background save reports from the forked writer, so it needs a
    pipe the child inherits: a ``fork``-context queue, created here before the fork. (Not the
    same queue for both: a same-process ``put`` into a multiprocessing queue reaches the pipe
    through a feeder thread, and megatron's ``get_nowait`` right after could miss it.)"""
    previous = filesystem_async._results_queue
    filesystem_async._results_queue = multiprocessing.get_context("fork").Queue() if background else queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _cause(exc: BaseException) -> str:
    """What failed, on every rank. megatron raises ``CheckpointException`` on all ranks but puts the
    writers' errors only into the coordinator's; every rank is at the same point then (it follows a
    broadcast), so the coordinator's account is shared with one all-gather."""
    if not isinstance(exc, CheckpointException):
        return str(exc)
    mine = "; ".join(f"rank {rank}: {failure[0] if isinstance(failure, tuple) else failure}"
                     for rank, failure in sorted(exc.failures.items()))
    accounts = [None] * dist.get_world_size()
    dist.all_gather_object(accounts, mine)
    return "; ".join(a for a in accounts if a) or str(exc)


class CheckpointWriteError(RunFailed):
    """A background checkpoint write failed on some rank (raised on every rank)."""


@dataclass
class _InFlight:
    step: int
    started: float


@_disable_gc()
def _write_then_describe(write: Callable, directory: Path, rank: int, checksums: bool, out, *args, **kwargs) -> None:
    """In the forked writer: megatron's write, then this rank's manifest entries for its shards.
    Without the garbage collector, as megatron's own writer: on a GPU the fork holds Python objects
    of the parent's CUDA tensors, and collecting one in the child would call into CUDA there."""
    write(*args, **kwargs)
    out.put(describe(directory, shards_of(directory, rank), checksums))


class BackgroundWrites:
    """The one background checkpoint write of this run (or none); collective like a save."""

    def __init__(self):
        self._calls = AsyncCallsQueue(persistent=False)  # a fork per save: the CPU snapshot needs it
        self._in_flight: Optional[_InFlight] = None

    @property
    def pending_step(self) -> Optional[int]:
        return self._in_flight.step if self._in_flight else None

    def start(self, step: int, request: AsyncRequest, directory: Path, checksums: bool,
              commit: Callable[[Dict[str, dict]], None]) -> None:
        """Fork the writer of ``request``; once every rank's writer finished, ``commit`` runs on
        every rank with the manifest entries its writer computed for the shards it wrote (their
        CRC-32 is taken in the background too, from the page cache, right after the write)."""
        described = multiprocessing.get_context("fork").SimpleQueue()  # a pipe: no feeder thread
        if request.async_fn is not None:  # None: nothing of the sharded state lives on this rank
            request = request._replace(async_fn=functools.partial(
                _write_then_describe, request.async_fn, directory, dist.get_rank(), checksums, described))
        request.add_finalize_fn(lambda: commit({} if described.empty() else described.get()))
        self._calls.schedule_async_request(request)
        self._in_flight = _InFlight(step, time.perf_counter())

    def poll(self, wait: bool = False) -> Optional[int]:
        """Every rank, every step: commit the write in flight if every rank's writer finished
        (``wait``: block until they have). Returns the step committed now, if any. A writer's
        failure raises here on every rank (megatron gathers each rank's write results)."""
        if self._in_flight is None:
            return None
        try:
            done = self._calls.maybe_finalize_async_calls(blocking=wait)
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            failed, self._in_flight = self._in_flight.step, None
            raise CheckpointWriteError(f"checkpoint iter_{failed:07d} was not written (it stays iter_{failed:07d}.tmp, "
                                       f"the previous checkpoint stays the newest): {_cause(exc)}") from exc
        if not done:
            return None
        finished, self._in_flight = self._in_flight, None
        logger.info("checkpoint iter_%07d committed: written in the background in %.2f s", finished.step,
                    time.perf_counter() - finished.started)
        return finished.step

    def abandon(self) -> None:
        """The run is failing: stop waiting for the writer (its ``.tmp`` is never committed and
        the next save removes it)."""
        if self._in_flight is not None:
            logger.warning("checkpoint iter_%07d was still being written: not committed (the previous checkpoint "
                           "stays the newest)", self._in_flight.step)
            for call in self._calls.async_calls:
                call.async_caller.close(abort=True)  # kills the forked writer
            self._calls, self._in_flight = AsyncCallsQueue(persistent=False), None

"""Background workers that return results in submission order.

Decoding runs on a pool of threads (PyAV, PIL and torch release the GIL in their heavy parts)
or processes (``spawn``: safe with CUDA/DALI and with megatron's threads; each process builds its
own tokenizer and decoder). Results are consumed strictly in submission order, so the stream of
samples is identical for any number or kind of workers; that is what makes the loader
deterministic and its resume exact. Dropping the prefetched futures (``reset``) is always safe:
they are not part of the loader's state.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterable, List, Optional

_WORK: Optional[Callable[[Any], Any]] = None  # the work function inside a worker process


def _init_process(work: Callable[[Any], Any]) -> None:
    global _WORK
    import torch

    torch.set_num_threads(1)  # processes parallelise across samples, not inside one
    _WORK = work


def _call_in_process(item: Any) -> Any:
    return _WORK(item)


class _Done(Future):
    """A future already resolved (num_workers=0 runs work inline)."""

    def __init__(self, value: Any):
        super().__init__()
        self.set_result(value)


class OrderedPool:
    def __init__(self, work: Callable[[Any], Any], num_workers: int, kind: str = "thread"):
        self.work = work
        self.num_workers = num_workers
        self.kind = kind
        self._executor: Optional[Executor] = None
        self._inflight: Deque[Future] = deque()

    def _get_executor(self) -> Optional[Executor]:
        if self.num_workers == 0:
            return None
        if self._executor is None:
            if self.kind == "thread":
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="casa-data")
            elif self.kind == "process":
                self._executor = ProcessPoolExecutor(
                    self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_process, initargs=(self.work,))
            else:
                raise ValueError(f"worker kind {self.kind!r} must be 'thread' or 'process'")
        return self._executor

    def submit(self, item: Any) -> None:
        executor = self._get_executor()
        if executor is None:
            self._inflight.append(_Done(self.work(item)))
        elif self.kind == "process":
            self._inflight.append(executor.submit(_call_in_process, item))
        else:
            self._inflight.append(executor.submit(self.work, item))

    def __len__(self) -> int:
        return len(self._inflight)

    def get(self) -> Any:
        """The oldest submitted item's result (blocks); worker exceptions re-raise here."""
        return self._inflight.popleft().result()

    def run_all(self, items: Iterable[Any]) -> List[Any]:
        """Process ``items`` now, in order (used while nothing else is in flight)."""
        assert not self._inflight, "run_all needs an empty pool"
        for item in items:
            self.submit(item)
        return [self.get() for _ in range(len(self._inflight))]

    def reset(self) -> None:
        """Forget prefetched work (not started ones are cancelled, running ones ignored)."""
        for future in self._inflight:
            future.cancel()
        self._inflight.clear()

    def close(self, wait: bool = True) -> None:
        self.reset()
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None

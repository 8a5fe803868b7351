"""Profiling a few training steps: Megatron-LM's ``--profile`` (config ``profile``).

Why in the loop and not around it: the first steps pay for allocator warm-up, kernel selection
and the data pipeline filling up, so a trace of a whole run says little; Megatron-LM profiles a
chosen step range on chosen ranks, and so does this. Two tools:

* ``torch``: ``torch.profiler`` over steps ``start_step .. end_step`` (CPU operators, and CUDA
  kernels on a GPU); each step is a ``train_step_<N>`` range in the trace. Written when the range
  ends (or when the run stops inside it): a Chrome trace ``rank<R>_steps<A>-<B>.json`` and the
  operators by self time ``..._ops.txt``, in ``<run_dir>/profile/``.
* ``nsys``: ``cudaProfilerStart`` / ``Stop`` around the range and an NVTX range per step, for
  ``nsys profile --capture-range=cudaProfilerApi casa-train ...`` (GPU only).

``memory_history`` records torch's CUDA allocator events over the range and dumps them as
``..._memory.pickle`` for pytorch.org/memory_viz (GPU only). Files are written under a temporary
name and renamed, so a run killed while writing leaves no half file. Profiling changes no
number of the run (tested: same losses with and without).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from casa_megatron.config.schema import ProfileConfig
from casa_megatron.runtime.atomic import atomic_write

logger = logging.getLogger(__name__)


class StepProfiler:
    """``before(step)`` / ``after(step)`` around every training step; ``close()`` at the end."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.enabled = cfg.enabled and rank in cfg.ranks
        self.dir = Path(run_dir) / "profile"
        self._profiler = None
        self._step_range: Optional[contextlib.AbstractContextManager] = None
        self._in_step = False  # a step's range is open (closed by after(), or by close() on a stop)
        self._first: Optional[int] = None
        self._last: Optional[int] = None

    @property
    def running(self) -> bool:
        return self._first is not None

    def before(self, step: int) -> None:
        if not self.enabled:
            return
        if not self.running and self.cfg.start_step <= step <= self.cfg.end_step:
            self._start(step)  # a resumed run may begin inside the range: profile what is left of it
        if not self.running:
            return
        if self.cfg.tool == "nsys":
            torch.cuda.nvtx.range_push(f"train_step_{step}")
        else:
            self._step_range = torch.profiler.record_function(f"train_step_{step}")
            self._step_range.__enter__()
        self._in_step = True

    def after(self, step: int) -> None:
        if not self.running:
            return
        self._end_step()
        self._last = step
        if step >= self.cfg.end_step:
            self._finish()

    def close(self) -> None:
        """The run ended (or stopped) inside the range: write what was recorded."""
        if self.running:
            self._end_step()
            self._finish()

    # --- internals ---------------------------------------------------------------------------
    def _start(self, step: int) -> None:
        self._first = step
        if self.cfg.memory_history:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        if self.cfg.tool == "nsys":
            torch.cuda.cudart().cudaProfilerStart()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                                with_stack=self.cfg.with_stack)
        self._profiler.__enter__()

    def _end_step(self) -> None:
        """Close the current step's range (an NVTX range, or the profiler's record_function)."""
        if not self._in_step:
            return
        if self.cfg.tool == "nsys":
            torch.cuda.nvtx.range_pop()
        else:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        self._in_step = False

    def _finish(self) -> None:
        first, last = self._first, self._last if self._last is not None else self._first
        self._first = None
        stem = f"rank{self.rank}_steps{first}-{last}"
        self.dir.mkdir(parents=True, exist_ok=True)
        written = []
        if self.cfg.tool == "nsys":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        else:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            trace = self.dir / f"{stem}.json"
            atomic_write(trace, lambda tmp: self._profiler.export_chrome_trace(str(tmp)))
            sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort_by, row_limit=40)
            atomic_write(self.dir / f"{stem}_ops.txt", lambda tmp: tmp.write_text(table + "\n"))
            written += [trace.name, f"{stem}_ops.txt"]
            self._profiler = None
        if self.cfg.memory_history:
            atomic_write(self.dir / f"{stem}_memory.pickle",
                    lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(f"{stem}_memory.pickle")
        what = ", ".join(written) if written else "an nsys capture range (cudaProfilerStart/Stop)"
        logger.info("profile of steps %d-%d on rank %d: %s in %s", first, last, self.rank, what, self.dir)

"""What every part of ``benchmarks/gpu_check.py`` shares: its result type, the "not available"
signal, relative errors and a CUDA-aware timer."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional

import torch


class NotAvailable(Exception):
    """A part cannot run here (no GPU, a package missing): reported, never a failure."""


@dataclass
class PartResult:
    part: str  # "a" .. "f"
    title: str
    status: str = "ok"  # ok | not available | failed | pending (a run cut short before it finished)
    reason: str = ""  # why not available / what failed
    markdown: str = ""  # the part's section body (tables, notes)
    data: dict = field(default_factory=dict)  # everything measured, for the JSON
    targets: dict = field(default_factory=dict)  # issue target name -> {"value", "target", "met"}
    seconds: float = 0.0
    measured_by: dict = field(default_factory=dict)  # {"command", "date_utc"} of the run that measured it

    @classmethod
    def from_json(cls, record: dict) -> "PartResult":
        """A part as an earlier run wrote it to the JSON (unknown keys ignored: older reports)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise NotAvailable(f"{what} needs a CUDA GPU; none is visible (torch {torch.__version__})")


def part_device(rehearse: bool, what: str) -> torch.device:
    """Where a GPU part runs: the GPU for a measurement; the CPU for a rehearsal
    (``gpu_check.py --rehearse-cpu``), which runs the same code at a small shape so that a bug in
    it shows up here, not in a lent GPU session. A rehearsal reports no GPU figure."""
    if rehearse:
        return torch.device("cpu")
    require_cuda(what)
    return torch.device("cuda", torch.cuda.current_device())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated in GiB; None on CPU (the rehearsal measures no memory)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def require_module(name: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise NotAvailable(f"{what} needs {name}: {type(exc).__name__}: {exc}") from exc


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def time_it(fn: Callable[[], object], repeats: int, warmup: int = 2) -> List[float]:
    """Seconds per call (CUDA events on a GPU, wall clock on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    on_gpu = torch.cuda.is_available()
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def target(value, limit, kind: str) -> dict:
    """kind 'max': value <= limit; 'min': value >= limit."""
    met = None if value is None else (value <= limit if kind == "max" else value >= limit)
    return {"value": value, "target": f"{'<=' if kind == 'max' else '>='} {limit}", "met": met}

"""Process-level services of a run: the run-directory lock, logging set-up, stop signals, atomic
file writes."""

from casa_megatron.runtime.atomic import atomic_write, atomic_write_json, atomic_write_text
from casa_megatron.runtime.lock import RunDirBusy, RunDirLock
from casa_megatron.runtime.logs import filter_startup_warnings, setup_logging
from casa_megatron.runtime.signals import StopRequest

__all__ = ["RunDirBusy", "RunDirLock", "StopRequest", "atomic_write", "atomic_write_json", "atomic_write_text",
           "filter_startup_warnings", "setup_logging"]

"""Process-level services of a run: the run-directory lock, logging set-up, stop signals."""

from casa_megatron.runtime.lock import RunDirBusy, RunDirLock
from casa_megatron.runtime.logs import filter_startup_warnings, setup_logging
from casa_megatron.runtime.signals import StopRequest

__all__ = ["RunDirBusy", "RunDirLock", "StopRequest", "filter_startup_warnings", "setup_logging"]

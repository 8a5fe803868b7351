"""Stop requests: SIGTERM (SLURM pre-emption, ``kill``) and SIGINT (Ctrl-C) both ask the loop to
finish the step in flight, write a checkpoint and exit cleanly. A second SIGINT means "now":
(after any first stop request) raises ``KeyboardInterrupt`` at once (``casa-train`` turns that into a one-line message and
exit status 130), leaving the previous complete checkpoint as the resume point.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the duration of training; ``requested`` names the signal once one arrived."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            hint = " (Ctrl-C again to exit at once, without a checkpoint)" if signum == signal.SIGINT else ""
            logger.warning("%s received: finishing this step, then writing a checkpoint%s", name, hint)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

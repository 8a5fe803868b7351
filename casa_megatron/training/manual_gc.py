"""Python's garbage collector at chosen steps only (``manual_gc_interval``, Megatron-LM's
``--manual-gc --manual-gc-interval``).

The automatic collector runs whenever allocation counts cross its thresholds: at a different
moment on every rank, and a full collection of a large training process (many Python objects:
data workers' buffers, megatron's modules and hooks) takes long enough that the other ranks wait
for it at the next collective. With many ranks some rank is always collecting. Collecting
everywhere at the same steps instead turns those stragglers into one short pause every N steps.
"""

from __future__ import annotations

import gc
from typing import Optional


class ManualGC:
    """``start()``: automatic collection off (``stop()`` puts it back as it was); ``step(i)``
    collects at every n-th step. ``n=0``: nothing changes."""

    def __init__(self, interval: int):
        self.interval = interval
        self._was_enabled: Optional[bool] = None

    def start(self) -> "ManualGC":
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.collect()  # start clean: what set-up left behind
            gc.disable()
        return self

    def step(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect()

    def stop(self) -> None:
        if self._was_enabled:
            gc.enable()

"""Opening a run before any work: the run-directory lock, the checkpoint directory's checks,
the resume compatibility pre-check, and the start-up banner. Everything that can refuse a run
happens here, before the model is built and before anything in the run directory is written.

Checks that only rank 0 performs (the lock, the writable probe) are broadcast, so every rank
raises the same one-line error instead of the others hanging at the next collective.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from casa_megatron.parallel.rank0 import on_rank0
from casa_megatron.runtime.lock import RunDirLock
from casa_megatron.tracking import resolve_tracking_uri
from casa_megatron.training.checkpoint import CheckpointError, Checkpointer
from casa_megatron.training.resume import precheck

logger = logging.getLogger("casa_megatron.train")


class RunSession:
    """``open()`` before building anything; ``close()`` at the end (releases the lock)."""

    def __init__(self, cfg, run_dir: Path, ckpt: Checkpointer):
        self.cfg, self.run_dir, self.ckpt = cfg, run_dir, ckpt
        self.locks: List[RunDirLock] = []
        self.took_over: List[str] = []

    def _lock(self, directory: Path) -> None:
        self.locks.append(RunDirLock(directory).acquire())
        if self.locks[-1].took_over:
            self.took_over.append(self.locks[-1].took_over)

    def _rank0_checks(self) -> Optional[str]:
        if self.cfg.skip_train:
            # scores a checkpoint and writes only new files of its own (evaluations/): no lock, so
            # that a run still training can be scored in its own folder; no writable checkpoint
            # folder needed (it may be read-only)
            return None
        try:
            self._lock(self.run_dir)
            self.ckpt.check_writable()
            run, ckpt = self.run_dir.resolve(), self.ckpt.dir.resolve()
            if ckpt != run and run not in ckpt.parents:  # elsewhere: two runs must not share it either
                self._lock(self.ckpt.dir)
            existing = self.ckpt.candidates()
            if existing and not self.cfg.checkpoint.resume:
                raise CheckpointError(
                    f"checkpoint.resume=false, but {self.ckpt.dir} already holds checkpoints "
                    f"({', '.join(p.name for p in existing[:3])}{', ...' if len(existing) > 3 else ''}), which a "
                    "new run would overwrite; move or delete them, or set run_dir / checkpoint.dir to a new "
                    "directory")
        except BaseException:
            self.close()
            raise
        return "; ".join(self.took_over) or None

    def open(self) -> None:
        took_over = on_rank0(self._rank0_checks)
        try:
            if took_over:
                logger.warning("run dir %s was locked by %s, which is no longer running; lock taken over",
                               self.run_dir, took_over)
            if self.cfg.checkpoint.resume:
                precheck(self.ckpt, self.cfg)
        except BaseException:
            self.close()
            raise
        tracking = self.cfg.tracking
        uri = resolve_tracking_uri(self.run_dir, tracking.tracking_uri) if tracking.enabled else "off"
        logger.info("run dir %s | checkpoints %s | MLflow %s", self.run_dir.resolve(), self.ckpt.dir.resolve(), uri)

    def close(self) -> None:
        while self.locks:
            self.locks.pop().release()

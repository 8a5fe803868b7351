"""One run per directory: an exclusive lock on ``<run_dir>/run.lock``, holding who owns it.

Two runs on one directory used to delete each other's ``.tmp`` saves, interleave
``metrics.jsonl`` rows and race on MLflow's schema migration. The lock is an ``flock`` on a
file that stays in place (never unlinked, so there is no window where two processes lock two
different files of the same name). The kernel drops an ``flock`` when its process dies, however
it dies, so a lock left by a SIGKILLed run is free again: the next run takes it over and says
whose it was. The file's content (pid, host, start time, command line) is only for messages.

Where ``flock`` is unsupported (some network file systems answer ENOLCK), it falls back to the
recorded pid: a holder on this host that no longer exists is stale; a holder on another host
cannot be checked, so the error says which file to remove once that run is known to be gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """``with RunDirLock(run_dir):`` or ``acquire()`` / ``release()``; ``took_over`` describes a
    stale holder that was replaced (None if the lock was free)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.took_over: Optional[str] = None
        self._fd: Optional[int] = None

    def _read_holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw.decode()) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return {"raw": raw[:200].decode(errors="replace")}

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = self._read_holder(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirBusy(f"run dir {self.path.parent} is in use by {_describe(self._read_holder(fd))} "
                                 f"(lock {self.path}); wait for it to finish, stop it, or choose another "
                                 f"run_dir") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._check_pid_holder(holder)
            if holder.get("pid") is not None or holder.get("raw"):
                self.took_over = _describe(holder)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "argv": sys.argv}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_pid_holder(self, holder: dict) -> None:
        """No flock here: judge the recorded holder by its pid (only possible on the same host)."""
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None or pid == os.getpid():
            return
        if host == socket.gethostname():
            if pid_alive(int(pid)):
                raise RunDirBusy(f"run dir {self.path.parent} is in use by {_describe(holder)} (lock {self.path})")
            return
        raise RunDirBusy(f"run dir {self.path.parent} is held by {_describe(holder)}, which cannot be checked from "
                         f"this host ({self.path.parent} has no flock support); remove {self.path} once that "
                         "run is known to be gone")

    def release(self) -> None:
        """Empty the file and drop the lock (the file stays: see the module docstring)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

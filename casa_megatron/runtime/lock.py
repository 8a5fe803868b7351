"""One run per directory: an exclusive lock on ``<run_dir>/run.lock``, holding who owns it.

Two runs on one directory used to delete each other's ``.tmp`` saves, interleave
``metrics.jsonl`` rows and race on MLflow's schema migration. The lock is an ``flock`` on a
file that stays in place (never unlinked, so there is no window where two processes lock two
different files of the same name). The kernel drops an ``flock`` when its process dies, however
it dies, so a lock left by a SIGKILLed run is free again: the next run takes it over and says
whose it was. The file's content (pid, host, start time, command line) is only for messages.

A SLURM job requeued after a node failure may find the lock still held by the dead node (a
network file system keeps it until the client's lease expires): a holder recorded with the same
``SLURM_JOB_ID`` and a lower ``SLURM_RESTART_COUNT`` is an earlier incarnation of this very job,
so the lock file is replaced and taken.

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


def _slurm_identity() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job_id": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)} if job else {}


def _earlier_incarnation_of_this_job(holder: dict) -> bool:
    """A SLURM job that was requeued keeps its id; SLURM never runs two incarnations at once,
    so a lock held by an earlier one belongs to a dead process. It matters on network file
    systems, where the lock of a node that died can outlive it until the server's lease
    expires, long after SLURM requeued the job."""
    mine = _slurm_identity()
    return bool(mine) and holder.get("slurm_job_id") == mine["slurm_job_id"] and \
        int(holder.get("slurm_restart", 0)) < mine["slurm_restart"]


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
                holder = self._read_holder(fd)
                if not _earlier_incarnation_of_this_job(holder):
                    raise RunDirBusy(f"run dir {self.path.parent} is in use by {_describe(holder)} "
                                     f"(lock {self.path}); wait for it to finish, stop it, or choose another "
                                     f"run_dir") from None
                os.close(fd)
                fd = self._fresh_lock_file()
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._check_pid_holder(holder)
            if holder.get("pid") is not None or holder.get("raw"):
                self.took_over = _describe(holder)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "argv": sys.argv, **_slurm_identity()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _fresh_lock_file(self) -> int:
        """Replace the lock file by a new one (a new inode, so the old ``flock`` no longer
        matters) and lock that; used only for a holder known to be dead."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("")
        os.replace(tmp, self.path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirBusy(f"run dir {self.path.parent}: lost the race for {self.path} to another process") from None
        return fd

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

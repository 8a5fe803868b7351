"""One run per directory: the run-dir lock refuses a live holder and takes over a dead one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from casa_megatron.runtime.lock import LOCK_NAME, RunDirBusy, RunDirLock


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
    with RunDirLock(tmp_path) as first:
        assert first.took_over is None
        with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path) as again:  # released: free again, nothing to take over
        assert again.took_over is None


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from casa_megatron.runtime.lock import RunDirLock; "
         f"RunDirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    lock = RunDirLock(tmp_path).acquire()
    try:
        assert f"pid {holder.pid}" in lock.took_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_stale_lock_file_without_a_holder_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": time.time()}))
    with RunDirLock(tmp_path) as lock:
        assert "pid 999999 on host elsewhere" in lock.took_over


def test_a_requeued_slurm_job_takes_over_its_earlier_incarnation(tmp_path, monkeypatch):
    """The earlier incarnation's lock is still held (as on a network file system after a node
    died); the same job id with a higher restart count takes it; another job does not."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = RunDirLock(tmp_path).acquire()
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused
        with pytest.raises(RunDirBusy):
            RunDirLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        with pytest.raises(RunDirBusy):  # same incarnation (e.g. a second srun step): refused
            RunDirLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued
        with RunDirLock(tmp_path) as second:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart"] == 1
            assert f"pid {os.getpid()}" in second.took_over  # the earlier incarnation, named
    finally:
        first.release()

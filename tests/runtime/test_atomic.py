"""Atomic writes: the file appears complete or not at all, and a failed write leaves no trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from casa_megatron.runtime.atomic import atomic_write, atomic_write_json, atomic_write_text, temporary_sibling


def test_text_and_json_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "sub" / "report.json"  # the folder is created
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": [1, 2]}, indent=1, sort_keys=True)
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert path.read_text().endswith("\n")
    atomic_write_text(tmp_path / "latest", "iter_0000003")
    assert (tmp_path / "latest").read_text() == "iter_0000003"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["latest", "report.json", "sub"]


def test_a_failing_writer_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def half_then_crash(tmp):
        tmp.write_text("new: ")  # half a file on disk ...
        raise OSError("disk full")  # ... then the writer fails

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_unserialisable_json_touches_nothing(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["eval.json"]


def test_path_only_writers_and_a_writer_that_writes_nothing(tmp_path):
    """Writers such as ``export_chrome_trace`` or ``savefig`` only take a path."""
    trace = tmp_path / "trace.json"
    atomic_write(trace, lambda tmp: open(tmp, "w").write("{}"))
    assert trace.read_text() == "{}"
    with pytest.raises(RuntimeError, match="produced no file"):
        atomic_write(tmp_path / "empty.txt", lambda tmp: None)
    assert not (tmp_path / "empty.txt").exists()


def test_a_killed_writer_leaves_the_old_file_under_its_name(tmp_path):
    """SIGKILL mid-write (no ``except`` runs): the final name still holds the previous content; the
    partial file is the hidden per-process sibling, which no reader opens."""
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"step": 1})
    script = ("import os, signal, sys; from pathlib import Path; from casa_megatron.runtime.atomic import atomic_write\n"
              "def w(tmp):\n    tmp.write_text('{\"step\": ')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write(Path({str(path)!r}), w)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert json.loads(path.read_text()) == {"step": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".manifest.json.tmp-")
    assert temporary_sibling(path).parent == path.parent  # same folder: the rename stays atomic

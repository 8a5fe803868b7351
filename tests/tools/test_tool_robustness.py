"""Tools that used to crash or leave debris: ``describe_model.py --help``; a killed
``make_synthetic_data.py`` leaving its hidden temporary folder behind."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_describe_model_help_and_bad_config():
    done = subprocess.run([sys.executable, "tools/describe_model.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: describe_model.py" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "tools/describe_model.py", "missing.yaml"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "config error: config file missing.yaml does not exist"


def _start_generator(out: Path):
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "make_synthetic_data.py"), "--out", str(out),
                             "--num-images", "5000", "--num-videos", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_temporary(parent: Path, proc) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        found = [p for p in parent.glob(".data.tmp-*") if any(p.rglob("*.png"))]
        if found:
            return found[0]
        assert proc.poll() is None, "the generator ended before writing anything"
        time.sleep(0.05)
    raise AssertionError("no temporary folder appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_generator_leaves_no_temporary_folder(tmp_path, sig):
    proc = _start_generator(tmp_path / "data")
    tmp = _wait_for_temporary(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:  # cleaned up on the way out
        assert not tmp.exists()
    else:  # SIGKILL cannot be caught: the next run removes what the dead process left
        assert tmp.exists()
        spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "tools" / "make_synthetic_data.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main(["--out", str(tmp_path / "data"), "--num-images", "2", "--num-videos", "0"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

"""Ctrl-C under ``launch/torchrun.sh``: SIGINT reaches the whole foreground process group
(torchrun and both workers, as in a terminal); the ranks agree on the step to stop after, write
one complete checkpoint (manifest included) and the run resumes from it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_under_torchrun_checkpoints_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    args = ["configs/tiny_cpu_synthetic.yaml", "train_steps=2000", "log_interval=1", "checkpoint.save_interval=1000",
            "optimizer.warmup_steps=4", "optimizer.wsd_decay_steps=0", "parallel.tensor_model_parallel_size=2",
            f"run_dir={run_dir}", "tracking.enabled=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(json.loads(l)["step"] >= 4 for l in metrics.read_text().splitlines())):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    proc.wait(timeout=240)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    step = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert step >= 4
    assert f"stopped by SIGINT at step {step}" in out, out[-2000:]
    assert err.count("SIGINT received: finishing this step") == 2, err[-3000:]  # rank 0 and rank 1
    ckpt = run_dir / "checkpoints" / f"iter_{step:07d}"
    assert (ckpt / "manifest.json").exists(), sorted(p.name for p in ckpt.iterdir())  # written last: complete
    assert not (run_dir / "checkpoints" / f"iter_{step:07d}.tmp").exists()
    # and it resumes: two more steps at TP=2 under torchrun
    env["MASTER_PORT"] = str(_free_port())
    resumed = subprocess.run(["bash", "launch/torchrun.sh", *args[:1], f"train_steps={step + 2}", *args[2:]],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 2

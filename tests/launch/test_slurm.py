"""launch/slurm.sbatch with a fake ``srun`` / ``scontrol`` on PATH: two "nodes" as two torchrun
processes on this machine (gloo). Relative paths of the config resolve against the submit
directory, not inside the code snapshot the job runs from."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's options, run the command once per "node" with its SLURM_NODEID.
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" > "$SLURM_SUBMIT_DIR/node$node.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _committed(path: str) -> bool:
    """The job runs ``git archive HEAD``: the test is meaningful only when the script and the
    package are committed as they are on disk (always true on a clean clone / CI)."""
    done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", path], capture_output=True, text=True)
    return done.returncode == 0 and not done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_two_node_job_resolves_paths_against_the_submit_dir(tmp_path):
    if not _committed("launch") or not _committed("casa_megatron"):
        pytest.skip("launch/ or casa_megatron/ has uncommitted changes: the job would run HEAD, not them")
    from casa_megatron.data.synthetic_dataset import make_dataset

    submit = tmp_path / "project"
    make_dataset(submit / "data", num_images=6, num_videos=0, samples_per_shard=3, progress=False)
    (submit / "cfg.yaml").write_text((REPO / "configs" / "tiny_cpu.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # torchrun is `python -m torch.distributed.run`: pinned to this interpreter (its venv may not
    # have the console script, e.g. one that reuses another venv's packages)
    torchrun = f"#!/usr/bin/env bash\nexec {sys.executable} -m torch.distributed.run \"$@\"\n"
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", torchrun)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "MASTER_PORT": str(_free_port()),
           "CASA_CODE_DIR": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    overrides = ["data.source=data/shards", "run_dir=runs/two_nodes", "train_steps=2", "log_interval=1",
                 "global_batch_size=4", "data.seq_length=64", "data.image_seq_length=96", "data.num_workers=0",
                 "data.pixel_budget=12544", "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=1",
                 "tracking.enabled=false"]
    done = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "cfg.yaml", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join((submit / f"node{n}.log").read_text() for n in (0, 1) if (submit / f"node{n}.log").exists())
    assert done.returncode == 0, done.stderr[-2000:] + logs[-4000:]
    run_dir = submit / "runs" / "two_nodes"  # in the submit dir, where the next job finds it
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "checkpoints" / "iter_0000002" / "manifest.json").exists()
    snapshot = submit / "runs" / "code-4242"
    assert (snapshot / "casa_megatron" / "train.py").exists() and (snapshot / "launch" / "snapshot_train.py").exists()
    assert not (snapshot / "runs").exists() and not (snapshot / "data").exists()  # nothing landed in the snapshot

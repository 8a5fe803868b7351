"""Part (g): background checkpoint saves on the GPU (``checkpoint.async_save``).

On a GPU megatron copies every tensor to host memory before it forks the writer; on the CPU
(where the tests run) the fork itself is the snapshot. So the GPU path has its own code, and it
needs a GPU run: ``benchmarks/checkpoint_save.py`` in a fresh interpreter, the real training
loop in bf16 (the first run of ``casa-train``'s loop on a GPU), synchronous and background saves
with the ``dp_reshardable`` optimizer format. The part fails unless the background checkpoint
holds exactly the synchronous one's tensors and both runs end at the same loss; it reports how
long saves held training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.gpu_parts.common import NotAvailable, PartResult

ROOT = Path(__file__).resolve().parents[2]


def run(quick: bool = False, rehearse: bool = False, deadline: Optional[float] = None) -> PartResult:
    if not rehearse and not torch.cuda.is_available():
        raise NotAvailable("the background save's GPU path (copy to host memory, then fork) needs a CUDA GPU; "
                           "the CPU path is measured by benchmarks/checkpoint_save.py and tested in "
                           "tests/training/test_async_save.py")
    steps, interval = (9, 4) if quick or rehearse else (12, 4)
    shown = ["--formats", "dp_reshardable", "--steps", str(steps), "--save-interval", str(interval),
             *(["--tiny"] if rehearse else []), "precision.bf16=true"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "checkpoint_save.json"
        cmd = [sys.executable, str(ROOT / "benchmarks/checkpoint_save.py"), *shown, "--json", str(out), "--dir", tmp]
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1.0)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"checkpoint_save.py {' '.join(shown)} ran past the budget ({timeout:.0f} s left "
                               "when it started)") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"checkpoint_save.py {' '.join(shown)} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2500:]}")
        report = json.loads(out.read_text())
    rows = report["results"]
    same = all(r["identical_to_sync"] for r in rows) and len({r["final_loss"] for r in rows}) == 1
    table = proc.stdout[proc.stdout.index("| mode"):].strip()
    where = "the CPU (a rehearsal: no GPU figure)" if rehearse else report["machine"].get("gpu") or "?"
    return PartResult("g", "Background checkpoint saves on the GPU", status="ok" if same else "failed",
                      reason="" if same else "the background checkpoint differs from the synchronous one",
                      data=report, markdown=f"`python benchmarks/checkpoint_save.py {' '.join(shown)}` on {where}:"
                                            f"\n\n{table}\n")

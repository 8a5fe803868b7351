"""Metrics on disk (``metrics.jsonl``), peak memory, and the loss-curve plot."""

from __future__ import annotations

import json
import logging
import resource
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from casa_megatron.runtime.atomic import atomic_write, atomic_write_text

logger = logging.getLogger("casa_megatron.train")


def peak_memory_bytes() -> int:
    """GPU: peak allocated by torch. CPU: peak resident set size of the process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_rows(path: Path) -> List[Dict]:
    """The rows of ``metrics.jsonl``, for a resume. A run killed while appending can leave its last
    line cut short: that line is dropped with a warning. Any other line that is not JSON is skipped
    and counted, and the file as it was is first kept aside as ``metrics.jsonl.damaged[-k]`` (the
    resume rewrites the file; nothing is lost and the run does not stop over its own log)."""
    lines = path.read_text().splitlines()
    rows, bad = [], []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1 and not bad:
                logger.warning("%s: dropped a last line cut short by the previous run (%d characters)",
                               path, len(line))
            else:
                bad.append(k + 1)
    if bad:
        aside = path.with_name(path.name + ".damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{n}")
        shutil.copy2(path, aside)
        logger.warning("%s: skipped %d line(s) that are not JSON (lines %s); the file as it was is kept as %s",
                       path, len(bad), ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""), aside.name)
    return rows


class MetricsLog:
    """Append-only JSON lines; on resume, rows after the checkpoint's step are dropped so the
    file holds exactly one curve. Validation rows (``{"step", "valid_loss"}``) are lines of
    their own, kept apart in ``eval_rows``."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int = 0):
        self.path, self.enabled = path, enabled
        self.rows: List[Dict] = []
        self.eval_rows: List[Dict] = []
        self.generation_rows: List[Dict] = []
        if not enabled:
            return
        kept: List[Dict] = []
        if truncate_after and path.exists():
            kept = [r for r in _read_rows(path) if r["step"] <= truncate_after]
            self.rows = [r for r in kept if "loss" in r]
            self.eval_rows = [r for r in kept if "valid_loss" in r]
            self.generation_rows = [r for r in kept if "generation" in r]
        # atomic: a resume killed here must not lose the curve up to the checkpoint
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write_eval(self, step: int, scores: Dict[str, float]) -> None:
        """``scores``: ``valid_loss`` and, with several validation sources, ``valid_loss/<name>``."""
        if not self.enabled:
            return
        row = {"step": step, **scores}
        self.eval_rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        sources = "".join(f" | {k.split('/', 1)[1]} {v:.4f}" for k, v in scores.items() if k.startswith("valid_loss/"))
        logger.info("step %5d | valid loss %.4f%s", step, scores["valid_loss"], sources)

    def write_generation(self, step: int, scores: Dict[str, float]) -> None:
        """``scores``: ``eval/megatron/<group>`` -> score (training/generation_eval.py), one row
        ``{"step", "generation": {group: score}}``."""
        if not self.enabled:
            return
        row = {"step": step, "generation": {k.split("/", 2)[2]: v for k, v in scores.items()}}
        self.generation_rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        mfu = f" (MFU {100 * metrics['mfu']:.1f}%)" if "mfu" in metrics else ""
        norm = f" | params norm {metrics['params_norm']:.3f}" if "params_norm" in metrics else ""
        logger.info("step %5d | loss %.4f | lr %.2e/%.2e | grad norm %.3f%s | %.0f text tok/s (%.0f answer) | "
                    "%.3g TFLOP/s/device%s | %.0f ms | %.2f GiB", step, metrics["loss"], metrics["lr_new"],
                    metrics["lr_pretrained"], metrics["grad_norm"], norm, metrics["text_tokens_per_s"],
                    metrics["answer_tokens_per_s"], metrics["tflops_per_device"], mfu,
                    metrics["step_time_s"] * 1000, metrics["peak_memory_gib"])

    def plot(self, out: Path, floor: Optional[float] = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], label="answer-token loss")
        if self.eval_rows:
            ax.plot([r["step"] for r in self.eval_rows], [r["valid_loss"] for r in self.eval_rows], "o-",
                    label="validation loss")
            for key in sorted({k for r in self.eval_rows for k in r if k.startswith("valid_loss/")}):
                rows = [r for r in self.eval_rows if key in r]
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], ".--", lw=1,
                        label=f"validation: {key.split('/', 1)[1]}")
        if floor is not None:
            ax.axhline(floor, ls="--", c="grey", label="best without vision")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(loc="upper left")
        answered = [r for r in self.generation_rows if "all" in r["generation"]]
        if answered:  # eval_generation: the held-out accuracy on its own axis
            acc = ax.twinx()
            acc.plot([r["step"] for r in answered], [r["generation"]["all"] for r in answered], "s-", c="tab:green",
                     label="held-out accuracy (generated)")
            acc.set_ylim(0, 1), acc.set_ylabel("accuracy"), acc.legend(loc="upper right")
        fig.tight_layout()
        try:  # rewritten at every evaluation: a viewer never sees half a PNG
            atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)

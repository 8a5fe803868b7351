"""How long checkpoint saves hold training: synchronous vs background writes (``checkpoint.async_save``).

    python benchmarks/checkpoint_save.py --json OUT.json [--steps 12 --save-interval 4] [key=value ...]

Each mode runs the real training loop (``casa_megatron.training.loop.train``) on the same config,
seed and data, each in a fresh forked process, saving every ``--save-interval`` steps with
``log_interval=1``. Read from each run's ``metrics.jsonl``:

* **held per save**: ``checkpoint_held_s``, the seconds checkpointing kept the loop from its next
  step, summed over the run and divided by the saves (synchronous: the whole save, write and
  commit; background: staging the state, the small per-rank files and the fork at the save, then
  the commit once the writers finished); and the part held at the save itself;
* **step time** of the steps right after a save (a background write in flight competes for the
  same cores and disk) and of the other steps;
* **wall time** of the whole run, and the checkpoint's size on disk.

Both optimizer formats are timed (``checkpoint.optimizer_format``: ``fully_reshardable`` gathers
the optimizer state on data-parallel rank 0 before writing, ``dp_reshardable`` writes each rank's
shard as it is). Every tensor of a background run's last interval checkpoint is compared with
the synchronous run's of the same format: it must hold exactly the same numbers (``same tensors``).

The model is the CASA model of ``configs/tiny_cpu_synthetic.yaml`` with a larger LM (``MODEL``
below; key=value overrides apply), fp32 with the distributed optimizer, so a checkpoint holds
weights, fp32 master weights and two Adam moments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `casa_megatron` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_info, run_in_child  # noqa: E402

BASE = ROOT / "configs/tiny_cpu_synthetic.yaml"
MODEL = ["model.lm.num_layers=6", "model.lm.hidden_size=1024", "model.lm.num_attention_heads=16",
         "model.lm.num_query_groups=4", "model.lm.ffn_hidden_size=2816"]
# (name, async_save, optimizer_format); the background run of a format is compared with its synchronous one
MODES = [("sync", "false", "fully_reshardable"), ("async", "true", "fully_reshardable"),
         ("sync", "false", "dp_reshardable"), ("async", "true", "dp_reshardable")]


def run_mode(async_save: str, optimizer_format: str, run_dir: str, steps: int, save_interval: int,
             overrides: list, model: list) -> dict:
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, str(BASE), [
        f"run_dir={run_dir}", f"train_steps={steps}", "log_interval=1", "tracking.enabled=false",
        f"checkpoint.save_interval={save_interval}", f"checkpoint.async_save={async_save}",
        f"checkpoint.optimizer_format={optimizer_format}",
        "checkpoint.keep_last=0", "optimizer.warmup_steps=2", "optimizer.wsd_decay_steps=0", *model, *overrides])
    start = time.perf_counter()
    train(cfg)
    return {"wall_s": time.perf_counter() - start}


def summarise(mode: str, optimizer_format: str, run_dir: Path, save_interval: int, wall_s: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    last = rows[-1]["step"]
    saves = [r["step"] for r in rows if r["step"] % save_interval == 0 and r["step"] < last]
    after = [r for r in rows if r["step"] - 1 in saves]  # a save's held time lands in the next row
    other = [r for r in rows if r["step"] - 1 not in saves and r["step"] > 2]  # after warm-up
    ckpt = run_dir / "checkpoints" / f"iter_{max(saves):07d}"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    return {"mode": mode, "optimizer_format": optimizer_format, "saves_timed": len(saves),
            # every second the loop was held (saves, and the commits of background writes), per save
            "held_per_save_s": sum(r["checkpoint_held_s"] for r in rows) / len(saves),
            "held_at_save_s": statistics.median(r["checkpoint_held_s"] for r in after),
            "step_after_save_s": statistics.median(r["step_time_s"] for r in after),
            "step_other_s": statistics.median(r["step_time_s"] for r in other),
            "wall_s": wall_s, "checkpoint_gib": size / 2**30, "final_loss": rows[-1]["loss"],
            "compared_checkpoint": ckpt.name}


def identical(a: Path, b: Path) -> bool:
    import torch

    from casa_megatron.training.checkpoint import read_tensors

    x, y = read_tensors(a), read_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-interval", type=int, default=4)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dir", help="run directories go here (default: a temporary folder, removed)")
    ap.add_argument("--formats", default="fully_reshardable,dp_reshardable", help="optimizer formats to time")
    ap.add_argument("--tiny", action="store_true", help="the tiny model of the base config (a quick rehearsal)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args(argv)
    if args.steps < 2 * args.save_interval + 1:
        ap.error("--steps must leave at least two interval saves with a step after each")
    modes = [m for m in MODES if m[2] in args.formats.split(",")]
    if not modes:
        ap.error(f"--formats {args.formats!r}: none of {sorted({m[2] for m in MODES})}")
    model = [] if args.tiny else MODEL
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results, sync_dir = [], {}
        for mode, async_save, fmt in modes:
            run_dir = Path(tmp) / f"{mode}_{fmt}"
            wall = run_in_child(run_mode, async_save, fmt, str(run_dir), args.steps, args.save_interval,
                                args.overrides, model, what=f"{mode} {fmt} run")["wall_s"]
            results.append(summarise(mode, fmt, run_dir, args.save_interval, wall))
            if mode == "sync":
                sync_dir[fmt] = run_dir
        # after every run: reading a checkpoint here starts threads, and a process forked after
        # that (the next run) can deadlock
        for result in results:
            ckpt = Path("checkpoints") / result["compared_checkpoint"]
            run_dir = Path(tmp) / f"{result['mode']}_{result['optimizer_format']}"
            result["identical_to_sync"] = identical(sync_dir[result["optimizer_format"]] / ckpt, run_dir / ckpt)
    print(format_table(results, [("mode", "mode", ""), ("optimizer format", "optimizer_format", ""),
                                 ("held per save (s)", "held_per_save_s", ".3f"),
                                 ("of it at the save (s)", "held_at_save_s", ".3f"),
                                 ("step after a save (s)", "step_after_save_s", ".3f"),
                                 ("other steps (s)", "step_other_s", ".3f"), ("wall (s)", "wall_s", ".1f"),
                                 ("checkpoint (GiB)", "checkpoint_gib", ".2f"),
                                 ("same tensors", "identical_to_sync", "")]))
    out = {"benchmark": "checkpoint_save", "model_overrides": model + args.overrides, "steps": args.steps,
           "save_interval": args.save_interval, "machine": machine_info(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

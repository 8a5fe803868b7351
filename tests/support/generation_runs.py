"""Short training runs on a generated dataset that answer held-out questions by generation
(``eval_generation``) and score their validation loss: shared by the generation-evaluation and
the ``skip_train`` tests (``tests/training/conftest.py`` builds them once per session)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ["eval_generation.max_samples=6", "eval_generation.max_new_tokens=5"]


def run_cfg(data: Path, run_dir, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig

    return load_config(TrainConfig, str(ROOT / "configs/tiny_cpu.yaml"), [
        f"run_dir={run_dir}", f"data.sources=[{{path: {data}/shards, weight: 1}}]", "log_interval=1",
        "checkpoint.save_interval=12", "optimizer.warmup_steps=2", "optimizer.decay_style=constant",
        "optimizer.wsd_decay_steps=0", "tracking.enabled=false", *overrides])


def train_run(rank, world, data, run_dir, overrides):
    from casa_megatron.training.loop import train

    return train(run_cfg(Path(data), run_dir, overrides))


def rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_runs(root: Path) -> dict:
    """``plain``: 14 steps; ``evaluated``: 24 steps with answers and the validation loss at 12 and
    24, tracked in MLflow; ``evaluated_tp2``: 12 steps at TP=2 with answers. A constant LR: runs
    of different lengths take the same steps."""
    from casa_megatron.data.synthetic_dataset import make_dataset
    from support.dist import run_distributed

    make_dataset(root / "data", num_images=12, num_videos=2, seed=5, video_seconds=2.0, valid_fraction=0.5,
                 samples_per_shard=8, progress=False)
    answered = [f"eval_generation.data={root / 'data/valid'}", "eval_generation.interval=12", *ANSWERS]
    validated = [f"data.valid=[{{path: {root / 'data/valid'}}}]", "eval_interval=12", "eval_iters=2",
                 "tracking.enabled=true", "tracking.system_metrics=false"]
    out = {}
    for name, overrides, world in (("plain", ["train_steps=14"], 1),
                                   ("evaluated", [*answered, *validated, "train_steps=24"], 1),
                                   ("evaluated_tp2", [*answered, "train_steps=12",
                                                      "parallel.tensor_model_parallel_size=2"], 2)):
        out[name] = root / name
        run_distributed(train_run, world_size=world, data=str(root / "data"), run_dir=str(out[name]),
                        overrides=overrides)
    out["valid"] = root / "data/valid"
    return out

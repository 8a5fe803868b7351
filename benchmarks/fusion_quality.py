"""Answer accuracy of each fusion trained for the same budget on a generated VQA task (CPU).

    python benchmarks/fusion_quality.py --config benchmarks/configs/quality_generated_cpu.yaml --json OUT.json [key=value ...]

Every fusion starts from the same backbone initialisation (per seed) and sees the same batches.
Accuracy = argmax of the logits at the position that predicts an answer token, on held-out
batches, per question group (see ``quality_tasks.py``). A text-only control (the
``control_fusion`` model trained and evaluated with every image replaced by Gaussian noise)
shows how far the questions can be answered without vision. With several ``seeds`` every run is
repeated per seed (model initialisation and data order) and the table shows mean +- s.d.

``task=colour_side`` is the in-memory colour/side task; ``task=generated`` is the real generated
dataset of ``tools/make_synthetic_data.py`` (PNG images with coarse and fine-grained questions,
H.264 clips with captions) read through ``make_train_iterator``, evaluated on a separate
held-out split (another generator seed), every held-out sample scored once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import FUSIONS, format_table, fusion_model_config, machine_info, train_step  # noqa: E402
from benchmarks.quality_tasks import TASKS, GeneratedConfig, Task  # noqa: E402
from casa_megatron.config.schema import ConfigError, ModelConfig  # noqa: E402
from casa_megatron.model.batch import VLMBatch  # noqa: E402


@dataclass
class QualityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: str = "colour_side"
    fusions: List[str] = field(default_factory=lambda: list(FUSIONS))
    control_fusion: str = "casa"  # trained and evaluated on noise images; "" = no control
    steps: int = 200
    micro_batch_size: int = 2
    num_microbatches: int = 4
    lr: float = 2e-3
    warmup_steps: int = 20
    clip_grad: float = 1.0
    eval_batches: int = 64  # upper bound; a held-out split that ends earlier stops the evaluation
    seeds: List[int] = field(default_factory=lambda: [1234])  # one training per fusion and seed
    data_seed: int = 0  # data order of seed i: data_seed + i
    generated: GeneratedConfig = field(default_factory=GeneratedConfig)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} not in {sorted(TASKS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be a non-empty list of distinct seeds")
        for f in [*self.fusions, *([self.control_fusion] if self.control_fusion else [])]:
            if f not in FUSIONS:
                raise ConfigError(f"fusion {f!r} not in {FUSIONS}")
            fusion_model_config(self.model, f).validate()


def _noise_images(batch: VLMBatch, g: torch.Generator) -> VLMBatch:
    return dataclasses.replace(batch, pixel_patches=torch.randn(batch.pixel_patches.shape, generator=g))


def train_and_evaluate(cfg: QualityConfig, task: Task, fusion: str, noise: bool, seed: int, data_seed: int) -> dict:
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=seed)
    model_cfg = dataclasses.replace(fusion_model_config(cfg.model, fusion),
                                    lm=dataclasses.replace(cfg.model.lm, vocab_size=task.vocab_size))
    model = build_vlm(model_cfg, ParallelConfig(), task.image_seq_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    data, g = task.batches(cfg.micro_batch_size, data_seed), torch.Generator().manual_seed(seed + 1)
    start, losses = time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        micro = [next(data) for _ in range(cfg.num_microbatches)]
        micro = [_noise_images(b, g) if noise else b for b in micro]
        losses.append(train_step(model, optimizer, micro, task.seq_length + task.image_seq_length,
                                 cfg.micro_batch_size, clip_grad=cfg.clip_grad))
    train_time = time.perf_counter() - start
    return {"fusion": fusion if not noise else f"{fusion} (noise images)", "mechanism": fusion,
            "noise_images": noise, "seed": seed, "data_seed": data_seed, "train_time_s": train_time,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "loss_curve": losses,
            **evaluate(model, task, cfg, noise, seed)}


@torch.no_grad()
def evaluate(model, task: Task, cfg: QualityConfig, noise: bool, seed: int) -> dict:
    """Argmax accuracy per group at the scored positions of the held-out batches."""
    model.eval()
    make = task.eval_batches or task.batches
    data, g = make(cfg.micro_batch_size, cfg.data_seed + 10_000), torch.Generator().manual_seed(seed + 2)
    names = [*task.headline, *task.detail]
    correct, total = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    hits_all = n_all = 0
    for _ in range(cfg.eval_batches):
        try:
            batch = next(data)
        except StopIteration:  # every held-out sample scored
            break
        groups = task.groups(batch)
        batch = _noise_images(batch, g) if noise else batch
        logits = model(dataclasses.replace(batch, labels=None))  # [s, b, v] (TP=1: full vocab)
        hit = logits.argmax(-1).transpose(0, 1) == batch.labels  # [b, s]
        for name in names:
            correct[name] += int((hit & groups[name]).sum())
            total[name] += int(groups[name].sum())
        scored = torch.zeros_like(hit)
        for name in task.headline:
            scored |= groups[name]
        hits_all, n_all = hits_all + int((hit & scored).sum()), n_all + int(scored.sum())
    getattr(data, "close", lambda: None)()  # stop the held-out loader's workers
    model.train()
    out = {"accuracy": hits_all / max(1, n_all), "answers": n_all}
    for name in names:
        out[f"accuracy_{name}"] = correct[name] / total[name] if total[name] else None
        out[f"answers_{name}"] = total[name]
    return out


def aggregate(results: List[dict], keys: List[str]) -> List[dict]:
    """One row per fusion label: mean and sample s.d. over seeds of every ``key``."""
    rows: Dict[str, dict] = {}
    for r in results:
        rows.setdefault(r["fusion"], {"fusion": r["fusion"], "runs": []})["runs"].append(r)
    out = []
    for row in rows.values():
        for k in keys:
            vals = [r[k] for r in row["runs"] if r.get(k) is not None]
            row[k] = statistics.fmean(vals) if vals else None
            row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        row["seeds"] = [r["seed"] for r in row.pop("runs")]
        out.append(row)
    return out


def _mean_sd(row: dict, key: str, spec: str):
    if row.get(key) is None:
        return None
    sd = row.get(f"{key}_sd")
    return format(row[key], spec) + (f" ± {format(sd, spec)}" if sd is not None else "")


def tables(task: Task, summary: List[dict]) -> str:
    head = [("accuracy", "accuracy", ".3f"), *[(n, f"accuracy_{n}", ".3f") for n in task.headline],
            ("final train loss", "final_train_loss", ".3f"), ("train time (s)", "train_time_s", ".1f")]
    shown = [{"fusion": r["fusion"], **{k: _mean_sd(r, k, spec) for _, k, spec in head}} for r in summary]
    chance = [{"fusion": "chance (no vision)", **{f"accuracy_{k}": format(v, ".3f") for k, v in task.chance.items()}}] \
        if task.chance else []
    text = format_table(shown + (chance if set(task.chance) & set(task.headline) else []),
                        [("fusion", "fusion", "")] + [(h, k, "") for h, k, _ in head])
    if task.detail:
        detail = [(n, f"accuracy_{n}", ".3f") for n in task.detail]
        rows = [{"fusion": r["fusion"], **{k: _mean_sd(r, k, spec) for _, k, spec in detail}} for r in summary]
        text += "\n\n" + format_table(rows + (chance if set(task.chance) & set(task.detail) else []),
                                       [("fusion", "fusion", "")] + [(h, k, "") for h, k, _ in detail])
    return text


def plot_losses(results: List[dict], path: str, window: int = 25) -> None:
    """Training-loss curves (moving average over ``window`` steps), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for r in results:
        curve = torch.tensor(r["loss_curve"])
        if len(curve) >= window:
            curve = torch.nn.functional.avg_pool1d(curve[None, None], window, 1)[0, 0]
        colour = colours.setdefault(r["fusion"], f"C{len(colours)}")
        label = r["fusion"] if sum(x["fusion"] == r["fusion"] for x in results[:results.index(r)]) == 0 else None
        ax.plot(range(len(curve)), curve.tolist(), color=colour, alpha=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_ylabel(f"answer loss ({window}-step mean, log scale)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the training-loss curves (PNG) here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. task=NAME steps=50)")
    args = parser.parse_args(argv)
    from casa_megatron.config import load_config, to_dict

    cfg = load_config(QualityConfig, args.config, args.overrides)
    task = TASKS[cfg.task](cfg)
    runs = [(f, False) for f in cfg.fusions] + ([(cfg.control_fusion, True)] if cfg.control_fusion else [])
    results = []
    for i, seed in enumerate(cfg.seeds):
        for fusion, noise in runs:
            results.append(train_and_evaluate(cfg, task, fusion, noise, seed, cfg.data_seed + i))
            r = results[-1]
            print(f"seed {seed} {r['fusion']}: accuracy {r['accuracy']:.3f} "
                  + " ".join(f"{n} {r['accuracy_' + n]:.3f}" for n in task.headline if r["accuracy_" + n] is not None)
                  + f" after {cfg.steps} steps ({r['train_time_s']:.1f} s)", file=sys.stderr, flush=True)
    names = [*task.headline, *task.detail]
    keys = ["accuracy", *[f"accuracy_{n}" for n in names], "final_train_loss", "train_time_s"]
    summary = aggregate(results, keys)
    per_group = ", ".join(f"{n} {results[0]['answers_' + n]}" for n in task.headline)
    print(f"task {task.name}: {cfg.steps} steps x {cfg.num_microbatches * cfg.micro_batch_size} rows, "
          f"seeds {cfg.seeds}, {results[0]['answers']} held-out answers ({per_group})")
    print(tables(task, summary))
    report = {"results": results, "summary": summary, "chance": task.chance, "task": task.name,
              "machine": machine_info(), "config": to_dict(cfg), "config_path": args.config,
              "type_names": task.headline, "detail_names": task.detail, "task_info": task.info,
              "text_only_loss_floor": _floor(task) if task.chance else None}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_losses(results, args.plot)
    return 0


def _floor(task: Task) -> float:
    """Mean answer loss of the best model without vision (uniform over each type's answers)."""
    return sum(-math.log(p) for p in task.chance.values()) / len(task.chance)


if __name__ == "__main__":
    sys.exit(main())

"""Answer accuracy of each fusion trained for the same budget on a generated VQA task (CPU).

    python benchmarks/fusion_quality.py --config benchmarks/configs/quality_cpu.yaml --json OUT.json [key=value ...]

Every fusion starts from the same backbone initialisation (same seed) and sees the same batches.
Accuracy = argmax of the logits at the position that predicts the answer token, on held-out
batches, overall and per question type. A text-only control (the ``control_fusion`` model
trained and evaluated with every image replaced by Gaussian noise) shows how far the questions
can be answered without vision: chance is 1/8 for colour and 1/2 for side questions.

Tasks are a registry (``TASKS``, name -> factory(cfg) -> :class:`Task`): a task gives batches,
how to read the question type of each answer position, and its type names. ``task=colour_side``
is the in-memory colour/side task; ``task=generated`` is the real generated dataset of
``tools/make_synthetic_data.py`` (PNG images with coarse and fine-grained questions, H.264 clips
with captions), read through ``make_train_iterator``: accuracy per type ``coarse`` / ``fine``
(image questions) and ``caption`` (video captions), scoring the answer / caption words (the
trivially predictable ``<eot>`` ending each answer is not counted). Training uses a dataset
generated with ``generated.seed``; evaluation a separate split generated with
``generated.eval_seed`` (held-out images and clips). Both are generated on first use into
``generated.dir`` (default: a cache directory under the system temp dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import FUSIONS, fusion_model_config, format_table, machine_info, train_step  # noqa: E402
from casa_megatron.config.schema import ConfigError, ModelConfig  # noqa: E402
from casa_megatron.data.config import DataConfig  # noqa: E402
from casa_megatron.model.batch import VLMBatch  # noqa: E402


@dataclass
class Task:
    name: str
    vocab_size: int
    seq_length: int
    image_seq_length: int
    batches: Callable[[int, int], Iterator[VLMBatch]]  # (micro_batch_size, seed) -> endless batches
    question_types: Callable[[VLMBatch], torch.Tensor]  # -> [b, s] long type id per position (-1: none)
    type_names: List[str]
    chance: Dict[str, float]  # best accuracy without vision, per type ({}: not known; see the control)
    eval_batches: Optional[Callable[[int, int], Iterator[VLMBatch]]] = None  # held-out split (None: batches)
    info: Dict = field(default_factory=dict)  # recorded in the report


def colour_side_task(cfg: "QualityConfig" = None, image_size: int = 56, seq_length: int = 30) -> Task:
    """``data/synthetic.py``: "what colour is the square" (8 answers) / "which side" (2)."""
    from casa_megatron.data import synthetic as syn

    tokens_per_image = (image_size // 28) ** 2
    per_row = seq_length // syn.SAMPLE_LEN

    def question_types(batch: VLMBatch) -> torch.Tensor:
        ids = batch.input_ids
        return torch.where(ids == syn.ASK_COLOUR, 0, torch.where(ids == syn.ASK_SIDE, 1, -1))

    return Task(
        name="colour_side", vocab_size=syn.VOCAB_SIZE, seq_length=seq_length,
        image_seq_length=per_row * tokens_per_image,
        batches=lambda b, seed: syn.synthetic_batches(b, seq_length, image_size, seed=seed),
        question_types=question_types, type_names=["colour", "side"],
        chance={"colour": 1 / len(syn.COLOURS), "side": 0.5},
    )


@dataclass
class GeneratedConfig:
    """``task=generated``: the dataset of tools/make_synthetic_data.py, train and held-out splits."""

    dir: str = ""  # where the splits live / are generated; "" = <tmp>/casa_megatron_fusion_quality
    num_images: int = 192  # training split
    num_videos: int = 24
    seed: int = 0
    eval_num_images: int = 96  # held-out split (another generator seed: unseen images and clips)
    eval_num_videos: int = 12
    eval_seed: int = 1
    video_seconds: float = 3.0
    data: DataConfig = field(default_factory=lambda: DataConfig(
        source="", seq_length=128, image_seq_length=160, num_workers=1, log_interval=0))


GENERATED_TYPES = ["coarse", "fine", "caption"]


def _generated_split(root: Path, num_images: int, num_videos: int, seed: int, seconds: float) -> Path:
    """``root/<split>/shards``, generating the split first if it is missing (atomic rename)."""
    import shutil
    import tempfile

    from casa_megatron.data.synthetic_dataset import make_dataset

    out = root / f"img{num_images}_vid{num_videos}_seed{seed}_sec{seconds:g}"
    if not (out / "shards").is_dir() or not (out / "tokenizer").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
        make_dataset(tmp, num_images, num_videos, seed, video_seconds=seconds, progress=False)
        try:
            tmp.replace(out)
        except OSError:  # generated meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "shards"


def generated_task(cfg: "QualityConfig") -> Task:
    """Coarse / fine-grained image questions and video captions from the real generated dataset."""
    import tempfile

    from casa_megatron.data import make_train_iterator
    from casa_megatron.data.packing import question_type_ids
    from casa_megatron.data.tokenization import TextTokenizer

    gen = cfg.generated
    root = Path(gen.dir) if gen.dir else Path(tempfile.gettempdir()) / "casa_megatron_fusion_quality"
    train = _generated_split(root, gen.num_images, gen.num_videos, gen.seed, gen.video_seconds)
    held_out = _generated_split(root, gen.eval_num_images, gen.eval_num_videos, gen.eval_seed, gen.video_seconds)
    data_cfg = dataclasses.replace(gen.data, source=str(train))
    data_cfg.validate()
    tok = TextTokenizer(data_cfg.resolved_tokenizer_path(), data_cfg.image_token, data_cfg.answer_token,
                        data_cfg.end_of_turn_token)
    n_vocab = tok.vocab_size() if callable(tok.vocab_size) else tok.vocab_size
    if cfg.model.lm.vocab_size < n_vocab:
        raise ConfigError(f"model.lm.vocab_size={cfg.model.lm.vocab_size} < the generated tokenizer's {n_vocab}")
    eot = tok.special.end_of_turn
    types: Dict[int, torch.Tensor] = {}  # id(batch) -> [b, s] type ids (batches are kept alive below)

    def batches(source: Path):
        def make(b: int, seed: int) -> Iterator[VLMBatch]:
            it = make_train_iterator(dataclasses.replace(data_cfg, source=str(source)), b, dp_rank=0, dp_size=1,
                                     seed=seed)
            try:
                while True:
                    batch = next(it)
                    infos = [dataclasses.replace(i, qtype="caption") if i.kind == "video" else i
                             for i in it.last_batch_samples]
                    t = question_type_ids(infos, tuple(batch.input_ids.shape), GENERATED_TYPES)
                    t = torch.where(batch.labels == eot, -1, t)  # score the words, not the final <eot>
                    types.clear()
                    types[id(batch)] = t
                    yield batch
            finally:
                it.close()
        return make

    return Task(
        name="generated", vocab_size=cfg.model.lm.vocab_size, seq_length=data_cfg.seq_length,
        image_seq_length=data_cfg.image_seq_length, batches=batches(train),
        question_types=lambda batch: types[id(batch)], type_names=list(GENERATED_TYPES), chance={},
        eval_batches=batches(held_out),
        info={"train_split": str(train), "held_out_split": str(held_out), "tokenizer_vocab": n_vocab},
    )


# name -> factory(cfg) -> Task.
TASKS: Dict[str, Callable[..., Task]] = {"colour_side": colour_side_task, "generated": generated_task}


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
    eval_batches: int = 64
    seed: int = 1234
    data_seed: int = 0
    generated: GeneratedConfig = field(default_factory=GeneratedConfig)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} not in {sorted(TASKS)}")
        for f in [*self.fusions, *([self.control_fusion] if self.control_fusion else [])]:
            if f not in FUSIONS:
                raise ConfigError(f"fusion {f!r} not in {FUSIONS}")
            fusion_model_config(self.model, f).validate()


def _noise_images(batch: VLMBatch, g: torch.Generator) -> VLMBatch:
    return dataclasses.replace(batch, pixel_patches=torch.randn(batch.pixel_patches.shape, generator=g))


def train_and_evaluate(cfg: QualityConfig, task: Task, fusion: str, noise: bool) -> dict:
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=cfg.seed)
    model_cfg = dataclasses.replace(fusion_model_config(cfg.model, fusion),
                                    lm=dataclasses.replace(cfg.model.lm, vocab_size=task.vocab_size))
    model = build_vlm(model_cfg, ParallelConfig(), task.image_seq_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    data, g = task.batches(cfg.micro_batch_size, cfg.data_seed), torch.Generator().manual_seed(1)
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
            "noise_images": noise, "train_time_s": train_time, "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            **evaluate(model, task, cfg, noise)}


@torch.no_grad()
def evaluate(model, task: Task, cfg: QualityConfig, noise: bool) -> dict:
    """Argmax accuracy at answer positions of held-out batches (a data seed no training run uses)."""
    model.eval()
    make = task.eval_batches or task.batches
    data, g = make(cfg.micro_batch_size, cfg.data_seed + 10_000), torch.Generator().manual_seed(2)
    correct = torch.zeros(len(task.type_names))
    total = torch.zeros(len(task.type_names))
    for _ in range(cfg.eval_batches):
        batch = next(data)
        types = task.question_types(batch)
        batch = _noise_images(batch, g) if noise else batch
        logits = model(dataclasses.replace(batch, labels=None))  # [s, b, v] (TP=1: full vocab)
        pred = logits.argmax(-1).transpose(0, 1)  # [b, s]
        at = (batch.loss_mask > 0) & (types >= 0)
        hit = (pred == batch.labels) & at
        for t in range(len(task.type_names)):
            correct[t] += (hit & (types == t)).sum()
            total[t] += (at & (types == t)).sum()
    model.train()
    out = {"accuracy": float(correct.sum() / total.sum().clamp(min=1)), "answers": int(total.sum())}
    for t, name in enumerate(task.type_names):
        out[f"accuracy_{name}"] = float(correct[t] / total[t]) if total[t] else None
        out[f"answers_{name}"] = int(total[t])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. task=NAME steps=50)")
    args = parser.parse_args(argv)
    from casa_megatron.config import load_config, to_dict

    cfg = load_config(QualityConfig, args.config, args.overrides)
    task = TASKS[cfg.task](cfg)
    runs = [(f, False) for f in cfg.fusions] + ([(cfg.control_fusion, True)] if cfg.control_fusion else [])
    results = []
    for fusion, noise in runs:
        results.append(train_and_evaluate(cfg, task, fusion, noise))
        r = results[-1]
        print(f"{r['fusion']}: accuracy {r['accuracy']:.3f} after {cfg.steps} steps "
              f"({r['train_time_s']:.1f} s)", file=sys.stderr, flush=True)
    columns = [("fusion", "fusion", ""), ("accuracy", "accuracy", ".3f"),
               *[(name, f"accuracy_{name}", ".3f") for name in task.type_names],
               ("final train loss", "final_train_loss", ".3f"), ("train time (s)", "train_time_s", ".1f")]
    chance = [{"fusion": "chance (no vision)", **{f"accuracy_{k}": v for k, v in task.chance.items()}}] \
        if task.chance else []
    print(f"task {task.name}: {cfg.steps} steps x {cfg.num_microbatches * cfg.micro_batch_size} rows, "
          f"{cfg.eval_batches * cfg.micro_batch_size} held-out rows ({results[0]['answers']} answers)")
    print(format_table(results + chance, columns))
    report = {"results": results, "chance": task.chance, "task": task.name, "machine": machine_info(),
              "config": to_dict(cfg), "config_path": args.config,
              "type_names": task.type_names, "task_info": task.info,
              "text_only_loss_floor": _floor(task) if task.chance else None}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _floor(task: Task) -> float:
    """Mean answer loss of the best model without vision (uniform over each type's answers)."""
    return sum(-math.log(p) for p in task.chance.values()) / len(task.chance)


if __name__ == "__main__":
    sys.exit(main())

"""The tasks of the fusion-quality benchmark: batches, held-out batches, and which answer
positions belong to which question group.

A task is a registry entry (``TASKS``, name -> factory(cfg) -> :class:`Task`). Groups are named
sets of scored positions: ``headline`` groups make the table (``coarse`` / ``fine`` / ``caption``),
``detail`` groups break them down by question (``shape``, ``colour``, ...) in the JSON and a second
table.
A position may be in several groups (a colour answer is ``coarse`` and ``colour``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from casa_megatron.config.schema import ConfigError
from casa_megatron.data.config import DataConfig
from casa_megatron.model.batch import VLMBatch

Groups = Dict[str, torch.Tensor]  # group name -> [b, s] bool: positions scored for that group


@dataclass
class Task:
    name: str
    vocab_size: int
    seq_length: int
    image_seq_length: int
    batches: Callable[[int, int], Iterator[VLMBatch]]  # (micro_batch_size, seed) -> endless batches
    groups: Callable[[VLMBatch], Groups]  # scored positions per group (answers only)
    headline: List[str]  # groups shown in the main table
    detail: List[str] = field(default_factory=list)  # finer groups (JSON + detail table)
    chance: Dict[str, float] = field(default_factory=dict)  # accuracy without vision, when known
    # Held-out split; its iterator may end (StopIteration) once every held-out sample was scored.
    eval_batches: Optional[Callable[[int, int], Iterator[VLMBatch]]] = None
    info: Dict = field(default_factory=dict)  # recorded in the report


def colour_side_task(cfg=None, image_size: int = 56, seq_length: int = 30) -> Task:
    """``data/synthetic.py``: "what colour is the square" (8 answers) / "which side" (2)."""
    from casa_megatron.data import synthetic as syn

    tokens_per_image = (image_size // 28) ** 2
    per_row = seq_length // syn.SAMPLE_LEN

    def groups(batch: VLMBatch) -> Groups:
        scored = batch.loss_mask > 0
        return {"colour": scored & (batch.input_ids == syn.ASK_COLOUR),
                "side": scored & (batch.input_ids == syn.ASK_SIDE)}

    return Task(
        name="colour_side", vocab_size=syn.VOCAB_SIZE, seq_length=seq_length,
        image_seq_length=per_row * tokens_per_image,
        batches=lambda b, seed: syn.synthetic_batches(b, seq_length, image_size, seed=seed),
        groups=groups, headline=["colour", "side"],
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
        source="", seq_length=128, image_seq_length=160, num_workers=1, log_interval=0,
        text_layout="layout_tokens"))  # the scorer reads our <answer> / <eot> layout tokens


GENERATED_TYPES = ["coarse", "fine", "caption"]


def _generated_split(root: Path, num_images: int, num_videos: int, seed: int, seconds: float) -> Path:
    """``root/<split>``, generating the split first if it is missing (atomic rename). The name
    carries the generator version, so a changed generator never reuses a stale cache."""
    from casa_megatron.data.synthetic_dataset import make_dataset
    from casa_megatron.data.synthetic_media import GENERATOR_VERSION

    out = root / f"v{GENERATOR_VERSION}_img{num_images}_vid{num_videos}_seed{seed}_sec{seconds:g}"
    if not (out / "shards").is_dir() or not (out / "tokenizer").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
        make_dataset(tmp, num_images, num_videos, seed, video_seconds=seconds, progress=False)
        try:
            tmp.replace(out)
        except OSError:  # generated meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _sample_keys(split: Path) -> List[str]:
    """Keys of the split's samples (one ``raw/<key>.json`` each)."""
    return [p.stem for p in sorted((split / "raw").glob("*.json"))]


def generated_task(cfg) -> Task:
    """Coarse / fine-grained image questions and video captions from the real generated dataset,
    read through ``make_train_iterator``; held-out batches score every held-out sample once."""
    from casa_megatron.data import make_train_iterator
    from casa_megatron.data.packing import question_type_ids
    from casa_megatron.data import synthetic_media as media
    from casa_megatron.data.synthetic_media import QUESTIONS
    from casa_megatron.data.tokenization import TextTokenizer

    gen = cfg.generated
    root = Path(gen.dir) if gen.dir else Path(tempfile.gettempdir()) / "casa_megatron_fusion_quality"
    train = _generated_split(root, gen.num_images, gen.num_videos, gen.seed, gen.video_seconds)
    held_out = _generated_split(root, gen.eval_num_images, gen.eval_num_videos, gen.eval_seed, gen.video_seconds)
    data_cfg = dataclasses.replace(gen.data, source=str(train / "shards"))
    data_cfg.validate()
    tok = TextTokenizer(data_cfg.resolved_tokenizer_path(), data_cfg.image_token, data_cfg.answer_token,
                        data_cfg.end_of_turn_token)
    n_vocab = tok.vocab_size() if callable(tok.vocab_size) else tok.vocab_size
    if cfg.model.lm.vocab_size < n_vocab:
        raise ConfigError(f"model.lm.vocab_size={cfg.model.lm.vocab_size} < the generated tokenizer's {n_vocab}")
    eot, answer = tok.special.end_of_turn, tok.special.answer
    # A scored position's question = the tokens right before the <answer> that opens its answer.
    questions = {name: tuple(tok.encode(text)) for name, text in QUESTIONS.items()}
    detail = list(QUESTIONS)
    last: Dict[int, Groups] = {}  # id(batch) -> its groups (only the newest batch is kept)

    def per_question(batch: VLMBatch, scored: torch.Tensor) -> Groups:
        out = {name: torch.zeros_like(scored) for name in detail}
        for r, s in scored.nonzero().tolist():
            row = batch.input_ids[r, :s + 1].tolist()
            at = len(row) - 1 - row[::-1].index(answer) if answer in row else -1
            for name, q in questions.items():
                if at >= len(q) and tuple(row[at - len(q):at]) == q:
                    out[name][r, s] = True
        return out

    def batches(split: Path, once: bool):
        n_samples = len(_sample_keys(split))

        def make(b: int, seed: int) -> Iterator[VLMBatch]:
            it = make_train_iterator(dataclasses.replace(data_cfg, source=str(split / "shards")), b,
                                     dp_rank=0, dp_size=1, seed=seed)
            seen: set = set()
            try:
                while not (once and len(seen) == n_samples):
                    batch = next(it)
                    infos = []
                    for info in it.last_batch_samples:  # one batch can hold a sample twice (epoch end)
                        if once and info.key in seen:
                            continue
                        seen.add(info.key)
                        infos.append(dataclasses.replace(info, qtype="caption") if info.kind == "video" else info)
                    scored = (batch.loss_mask > 0) & (batch.labels != eot)  # words, not the final <eot>
                    types = question_type_ids(infos, tuple(batch.input_ids.shape), GENERATED_TYPES)
                    groups = {n: scored & (types == k) for k, n in enumerate(GENERATED_TYPES)}
                    groups.update(per_question(batch, groups["coarse"] | groups["fine"]))
                    last.clear()
                    last[id(batch)] = groups
                    yield batch
            finally:
                it.close()
        return make

    return Task(
        name="generated", vocab_size=cfg.model.lm.vocab_size, seq_length=data_cfg.seq_length,
        image_seq_length=data_cfg.image_seq_length, batches=batches(train, once=False),
        groups=lambda batch: last[id(batch)], headline=list(GENERATED_TYPES), detail=detail,
        eval_batches=batches(held_out, once=True),
        # answers are drawn uniformly by the generator: 1 / (number of possible answers)
        chance={"shape": 1 / len(media.SHAPES), "colour": 1 / len(media.COLOURS), "count": 1 / len(media.COUNT_WORDS),
                "number": 1 / 90, "word": 1 / len(media.WORDS), "chart": 1 / len(media.BARS)},
        info={"train_split": str(train), "held_out_split": str(held_out), "tokenizer_vocab": n_vocab,
              "held_out_samples": len(_sample_keys(held_out))},
    )


# name -> factory(cfg) -> Task.
TASKS: Dict[str, Callable[..., Task]] = {"colour_side": colour_side_task, "generated": generated_task}

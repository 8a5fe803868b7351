"""Hugging Face Parquet datasets -> our tar shards: how hub VLM datasets enter the pipeline.

Most VLM training sets on the Hugging Face hub are Parquet files whose image columns hold the
encoded images (``datasets``' ``Image`` feature: ``{"bytes": ..., "path": ...}``). Parquet is
read a row group at a time, which a random-access loader cannot afford (a row group of images
per sample read), so the rows are converted once into webdataset tar shards (``shards.py``),
indexed (``shard_index.py``), and read like any other shards. Three row layouts, told apart by
their columns:

``cauldron``  ``images`` (list of images), ``texts`` (list of ``{user, assistant, source?}``):
              The Cauldron / FineVision. The images come before the first question.
``messages``  ``messages`` (TRL / ``apply_chat_template`` chat messages whose image parts carry
              no path) and ``images``: llava-instruct-mix-vsft and TRL's VLM datasets.
``llava``     ``conversations`` (``{from, value}`` with ``<image>`` placeholders) and ``image`` (one
              image) or ``images``: LLaVA-OneVision-Data's Parquet release.
``vqa``       ``question``, ``answers`` / ``answer`` / ``multiple_choice_answer`` and ``image``: the
              benchmark releases (lmms-eval's DocVQA, ChartQA, TextVQA, VQAv2): one-turn samples
              that keep every acceptable answer and, with ``metric``, the benchmark's rule.
``caption``   ``image`` and ``caption`` (a string, or a list such as COCO's / Flickr30k's five):
              image-text pairs for the pretraining stage (``formats.py``'s caption format).

Each row becomes a sample ``<folder>/<file stem>-<row>`` (the folder below the files' common
one) holding its annotation (``<key>.json`` in the
``messages`` or LLaVA format, the row's ``id`` and other plain columns kept as fields) and its
images as the sample's media parts in order (``<key>.png``, or ``<key>.0.jpg``, ``<key>.1.png``,
...; the extension from the image's own bytes). An image given by ``path`` alone is read from
``media_root``. A row that cannot become a sample (an image with neither bytes nor a readable
file, a layout field of the wrong type) is skipped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from casa_megatron.data.locations import files_in
from casa_megatron.data.records import SampleError, ShardError

LAYOUTS = {"cauldron": ("images", "texts"), "messages": ("messages",), "llava": ("conversations",),
           "vqa": ("question",), "caption": ("image", "caption")}
ANSWER_COLUMNS = ("answers", "answer", "multiple_choice_answer")  # vqa: the first present is the reference
TYPE_COLUMNS = ("question_type", "answer_type", "type", "question_types", "category")
OPTION_COLUMNS = ("options", "choices")  # vqa: a multiple-choice row
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA's evaluation prompt
_MAGIC = [(b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"BM", "bmp")]


def detect_layout(columns: Sequence[str], where: str) -> str:
    """The row layout of a Parquet file from its column names (``ShardError`` naming them if none)."""
    for name, needs in LAYOUTS.items():
        if all(c in columns for c in needs) and (name != "vqa" or any(c in columns for c in ANSWER_COLUMNS)):
            return name
    raise ShardError(f"{where}: columns {sorted(columns)} match no known layout: "
                     + "; ".join(f"{name} needs {list(needs)}" for name, needs in LAYOUTS.items())
                     + f" and one of {list(ANSWER_COLUMNS)}")


def image_extension(data: bytes) -> Optional[str]:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def _image_bytes(image: Any, media_root: Optional[Path], where: str) -> bytes:
    """An image cell (``{"bytes", "path"}``, or raw bytes) as encoded bytes."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            return bytes(image["bytes"])
        path = image.get("path")
        if isinstance(path, str) and path:
            full = Path(path) if Path(path).is_absolute() or media_root is None else media_root / path
            try:
                return full.read_bytes()
            except OSError as e:
                raise SampleError("missing_media", f"{where}: image {path!r} has no bytes and {full} cannot be "
                                  f"read ({e.strerror})") from e
    raise SampleError("missing_media", f"{where}: an image cell with neither bytes nor a path ({type(image).__name__})")


def _images(row: dict, columns: Sequence[str], media_root: Optional[Path], where: str) -> List[bytes]:
    cells: List[Any] = []
    for name in columns:
        value = row.get(name)
        if value is None:
            continue
        cells.extend(value if isinstance(value, list) else [value])
    return [_image_bytes(cell, media_root, f"{where}, image {i}") for i, cell in enumerate(cells)]


def _plain(row: dict, skip: Sequence[str]) -> Dict[str, Any]:
    """The row's other columns that JSON can hold as they are (ids, sources, types)."""
    return {k: v for k, v in row.items() if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def row_sample(row: dict, layout: str, media_root: Optional[Path], where: str,
               metric: Optional[str] = None) -> Tuple[dict, List[bytes]]:
    """(annotation, images) of one row; ``SampleError`` when it cannot become a sample."""
    if layout == "cauldron":
        images = _images(row, ["images"], media_root, where)
        texts = row.get("texts")
        if not isinstance(texts, list) or not texts or not all(
                isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
                for t in texts):
            raise SampleError("bad_annotation", f"{where}: 'texts' must be a non-empty list of {{user, assistant}}")
        messages = []
        for i, turn in enumerate(texts):
            content = [{"type": "image"}] * (len(images) if i == 0 else 0) + [_text_part(turn["user"])]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [_text_part(turn["assistant"])]}]
        source = texts[0].get("source")
        annotation = {"messages": messages, **({"source": source} if isinstance(source, str) else {})}
        return {**_plain(row, ("images", "texts")), **annotation}, images
    if layout == "messages":
        images = _images(row, ["images"], media_root, where)
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise SampleError("bad_annotation", f"{where}: 'messages' must be a list")
        cleaned = []
        for msg in messages:
            if not isinstance(msg, dict):
                raise SampleError("bad_annotation", f"{where}: a message is not an object")
            content = msg.get("content")
            if isinstance(content, list):  # Arrow gives every part every field: drop the empty ones
                content = [{k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                           for part in content]
            cleaned.append({"role": msg.get("role"), "content": content})
        return {**_plain(row, ("images", "messages")), "messages": cleaned}, images
    if layout == "vqa":
        return _vqa(row, media_root, where, metric)
    if layout == "caption":
        images = _images(row, ["image"], media_root, where)
        if len(images) != 1:
            raise SampleError("missing_media", f"{where}: an image-text pair needs one image")
        caption = row.get("caption")
        texts = caption if isinstance(caption, list) else [caption]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise SampleError("empty_turn", f"{where}: 'caption' must be a non-empty string or list of them")
        return {**_plain(row, ("image",)), "caption": caption}, images
    images = _images(row, ["image", "images"], media_root, where)
    conversations = row.get("conversations")
    if not isinstance(conversations, list):
        raise SampleError("bad_annotation", f"{where}: 'conversations' must be a list")
    annotation = {**_plain(row, ("image", "images", "conversations")),
                  "conversations": [{"from": t.get("from"), "value": t.get("value")} if isinstance(t, dict) else t
                                    for t in conversations]}
    return annotation, images


def _answer_text(value: Any) -> Optional[str]:
    """An answer cell: a string or number, or VQAv2's ``{answer, answer_confidence, answer_id}``."""
    if isinstance(value, dict):
        value = value.get("answer")
    if isinstance(value, bool) or value is None:
        return None
    return str(value) if isinstance(value, (str, int, float)) else None


def _options(row: dict, where: str) -> Optional[List[str]]:
    """A multiple-choice row's options (``options`` / ``choices``: a list, or MMMU's string form
    of one), else None."""
    import ast

    value = next((row[c] for c in OPTION_COLUMNS if row.get(c) is not None), None)
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SampleError("bad_annotation", f"{where}: options {value[:80]!r} are not a list") from None
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or len(value) > 26:
        raise SampleError("bad_annotation", f"{where}: options must be a list of 1 to 26 choices")
    return [str(v) for v in value]


def _choice_answer(answer: Any, options: List[str], where: str) -> str:
    """The answer's option letter: from an index (ScienceQA's int, AI2D's "1"), a letter (MMMU),
    or the option's own text."""
    text = str(answer).strip() if answer is not None else ""
    if isinstance(answer, int) or text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper().isalpha():
        index = ord(text.upper()) - ord("A")
    elif text in options:
        index = options.index(text)
    else:
        index = -1
    if not 0 <= index < len(options):
        raise SampleError("bad_annotation", f"{where}: answer {answer!r} names none of the {len(options)} options")
    return chr(ord("A") + index)


def _vqa(row: dict, media_root: Optional[Path], where: str, metric: Optional[str]) -> Tuple[dict, List[bytes]]:
    """A benchmark row (``question``, the answers, the image: lmms-eval's DocVQA, ChartQA,
    TextVQA, VQAv2 releases) -> a one-turn LLaVA sample whose ``answers`` keep every
    acceptable answer, ``metric`` the scoring rule (``evaluation/answer_metrics.py``). With
    ``options`` / ``choices`` (AI2D, ScienceQA, MMMU) the question lists them as ``A. ...`` lines
    and asks for the letter, as LLaVA's evaluation prompts do; the answer is the letter and the
    metric ``choice`` unless one is given."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise SampleError("bad_annotation", f"{where}: no question")
    images = _images(row, ["image", "images"], media_root, where)
    options = _options(row, where)
    if options is not None:
        answer = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
        reference = _choice_answer(answer, options, where)
        answers, metric = [reference], metric or "choice"
        lines = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
        question = f"{question}\n{lines}\n{CHOICE_PROMPT}"
    else:
        answers = []
        for column in ANSWER_COLUMNS:
            value = row.get(column)
            cells = value if isinstance(value, list) else [value]
            answers = [a for a in (_answer_text(c) for c in cells) if a is not None and a.strip()]
            if answers:
                break
        if not answers:
            raise SampleError("bad_annotation", f"{where}: no answer in {[c for c in ANSWER_COLUMNS if c in row]}")
        reference = _answer_text(row.get("multiple_choice_answer")) or answers[0]  # VQAv2's consensus answer
    qtype = next((str(row[c]) for c in TYPE_COLUMNS if isinstance(row.get(c), (str, int))), None)
    skip = ("image", "images", "question", *ANSWER_COLUMNS, *OPTION_COLUMNS)
    annotation = {**_plain(row, skip), "conversations": [
        {"from": "human", "value": "<image>\n" * len(images) + question},
        {"from": "gpt", "value": reference}], "answers": answers}
    if qtype is not None:
        annotation["type"] = qtype
    if metric is not None:
        annotation["metric"] = metric
    return annotation, images


@dataclass
class ParquetReport:
    files: int = 0
    rows: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    first_skipped: List[str] = field(default_factory=list)  # the first few, with why
    layouts: Dict[str, str] = field(default_factory=dict)  # file -> layout


def parquet_files(locations: Sequence[str | Path]) -> List[Path]:
    """Every ``*.parquet`` below the folders given (sorted) and the files given."""
    out = files_in(locations, ".parquet", recursive=True)
    if not out:
        raise FileNotFoundError(f"no .parquet files in {', '.join(map(str, locations))}")
    return out


def iter_samples(files: Sequence[Path], media_root: Optional[Path], report: ParquetReport,
                 batch_rows: int = 64, metric: Optional[str] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, parts) of every row that makes a sample, file by file, ``batch_rows`` rows at a time
    (a few row groups' images in memory, never a whole file)."""
    import os

    import pyarrow.parquet as pq

    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    for path in files:
        # the key keeps the file's folder below the common root: hub datasets name every subset's
        # files alike (The Cauldron: ai2d/train-00000-of-00001.parquet, chart2text/train-...)
        folder = path.parent.relative_to(root).as_posix()
        prefix = (f"{folder}/" if folder != "." else "") + path.stem.replace(".", "_")
        try:
            reader = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ShardError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        layout = detect_layout(reader.schema_arrow.names, str(path))
        report.files += 1
        report.layouts[str(path)] = layout
        row = 0
        for batch in reader.iter_batches(batch_size=batch_rows):
            for values in batch.to_pylist():
                key = f"{prefix}-{row:09d}"
                where = f"{path.name} row {row}"
                row += 1
                report.rows += 1
                try:
                    annotation, images = row_sample(values, layout, media_root, where, metric)
                except SampleError as e:
                    report.skipped[e.reason] += 1
                    if len(report.first_skipped) < 5:
                        report.first_skipped.append(str(e))
                    continue
                parts = {"json": json.dumps(annotation, ensure_ascii=False).encode()}
                for i, data in enumerate(images):
                    ext = image_extension(data) or "png"
                    parts[ext if len(images) == 1 else f"{i}.{ext}"] = data
                report.samples += 1
                yield key, parts


def convert(locations: Sequence[str | Path], out_dir: str | Path, samples_per_shard: int = 1000,
            media_root: Optional[str | Path] = None, force: bool = False, progress: bool = True,
            metric: Optional[str] = None) -> ParquetReport:
    """Parquet files -> ``out_dir/shard-NNNNNN.tar`` (+ their indexes), written into a hidden sibling
    that replaces ``out_dir`` only once complete (an existing, non-empty one only with ``force``).
    ``metric``: the scoring rule written into every ``vqa``-layout sample (``casa-eval``)."""
    if metric is not None:
        from casa_megatron.evaluation.answer_metrics import METRICS

        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is not one of {sorted(METRICS)}")
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from casa_megatron.data.shard_index import index_shards
    from casa_megatron.data.shards import ShardWriter
    from casa_megatron.runtime.atomic import staged_folder

    files = parquet_files(locations)
    total = 0
    for path in files:
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    report = ParquetReport()
    root = Path(media_root) if media_root else None
    with staged_folder(out_dir, force, "it may hold data shards") as tmp:
        with ShardWriter(tmp, samples_per_shard) as writer, \
                tqdm(total=total, desc="parquet -> shards", unit="row", disable=not progress) as bar:
            for key, parts in iter_samples(files, root, report, metric=metric):
                writer.write(key, parts)
                bar.update(report.rows - bar.n)
            bar.update(report.rows - bar.n)
        if not writer.paths:
            raise ShardError(f"no row of {len(files)} Parquet file(s) made a sample (skipped: {dict(report.skipped)}; "
                             f"first: {report.first_skipped[:1]})")
        indexed = index_shards(writer.paths, progress=False)
        if indexed.failed:
            raise ShardError(f"indexing the new shards failed: {indexed.failed}")
    return report

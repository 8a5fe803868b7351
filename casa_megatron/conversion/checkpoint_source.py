"""What ``export-hf`` reads, found and checked before any model is built.

Accepted (``locate_checkpoint``):

* a training checkpoint ``iter_N/`` written by ``casa-train`` (any TP/PP: the weights are
  megatron dist-checkpoint tensors under global names): its ``config.yaml`` gives the model
  and the data settings (tokenizer, processor budgets); its ``manifest.json``
  (``training/ckpt_manifest.py``) must list every file with the right size and CRC-32;
* a run's ``checkpoints/`` folder (its ``latest`` pointer, else the newest ``iter_N``), or the
  run directory that holds it;
* a folder written by ``casa-convert import-hf`` (``architecture.yaml``, ``model.yaml``,
  ``weights/``; its tokenizer / processor files were copied from the HF source).

Anything else is refused with what was expected. The tensors themselves are checked against
the model after it is built (``exporter.check_weights``: missing tensors are named).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from casa_megatron.config.coerce import from_dict
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.loader import load_config_dict, read_yaml
from casa_megatron.config.pretrained import ARCHITECTURE_FILE, RUN_CONFIG, WEIGHTS_DIR
from casa_megatron.config.run_files import saved_tokenizer, with_saved_template
from casa_megatron.config.schema import ModelConfig
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.data.config import DataConfig
from casa_megatron.training.ckpt_manifest import MANIFEST, check_files, read_manifest

logger = logging.getLogger(__name__)
ITER = re.compile(r"^iter_(\d+)$")
METADATA = "metadata.json"  # megatron dist checkpoint marker
EXPECTED = ("expected a training checkpoint (iter_N/ with config.yaml, metadata.json and manifest.json, "
            "written by casa-train), a run's checkpoints/ folder or run directory, or a folder written by "
            "`casa-convert import-hf` (architecture.yaml, model.yaml, weights/)")


@dataclass
class CheckpointSource:
    kind: str  # "training" | "import"
    path: Path  # the checkpoint directory (iter_N/ or the import folder)
    weights: Path  # the megatron dist checkpoint directory
    model: ModelConfig
    data: DataConfig  # the run's data settings (defaults for an import)
    tokenizer_candidates: List[Path] = field(default_factory=list)
    step: Optional[int] = None


def locate_checkpoint(path: str | Path, verify: bool = True) -> CheckpointSource:
    """The checkpoint at ``path`` (an ``iter_N/``, a run's ``checkpoints/`` folder or run directory,
    an import folder). ``verify``: a training checkpoint's files are checked against its manifest
    (sizes and CRC-32: a full read); False where the caller checked them already."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p}: no such directory; {EXPECTED}")
    if not p.is_dir():
        raise ConversionError(f"{p} is a file, not a checkpoint directory; {EXPECTED}")
    if (p / ARCHITECTURE_FILE).exists() or (p / WEIGHTS_DIR).is_dir():
        return _import_folder(p)
    if (p / "checkpoints").is_dir() and not (p / METADATA).exists():
        p = p / "checkpoints"  # a run directory
    if (p / METADATA).exists() or ITER.match(p.name):
        return _training_checkpoint(p, verify)
    if p.name.endswith(".tmp") and ITER.match(p.name[:-4]):
        raise ConversionError(f"{p} is a checkpoint whose save never finished (.tmp); use a complete iter_N/")
    newest = _newest(p)
    if newest is None:
        found = sorted(x.name for x in p.iterdir())[:8]
        raise ConversionError(f"{p} is not a checkpoint (it holds {found or 'nothing'}); {EXPECTED}")
    return _training_checkpoint(newest, verify)


def _newest(folder: Path) -> Optional[Path]:
    """A checkpoints/ folder: the ``latest`` pointer, else the newest ``iter_N``."""
    pointer = folder / "latest"
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if not target.is_dir():
            raise ConversionError(f"{pointer} names {target.name}, which does not exist; pass an iter_N/ folder")
        return target
    found = sorted(((int(m.group(1)), x) for x in folder.iterdir() if (m := ITER.match(x.name)) and x.is_dir()),
                   reverse=True)
    return found[0][1] if found else None


def _training_checkpoint(p: Path, verify: bool) -> CheckpointSource:
    config = p / RUN_CONFIG
    if not config.exists():
        raise ConversionError(f"{p} has no {RUN_CONFIG}: not a checkpoint written by casa-train; {EXPECTED}")
    if verify:
        _check_complete(p)
    if not (p / METADATA).exists():
        raise ConversionError(f"{p} has no {METADATA}: no megatron dist checkpoint in it")
    try:
        run = read_yaml(config)
        model = load_config_dict(ModelConfig, run.get("model") or {})
    except ConfigError as exc:
        raise ConversionError(f"{config}: {exc}") from exc
    data = with_saved_template(_data_config(run.get("data") or {}, config), p)  # the template it trained with
    saved = saved_tokenizer(p)  # the checkpoint's own copy first: the tokenizer it was trained with
    candidates = ([saved] if saved is not None else []) + _tokenizer_candidates(data)
    pretrained = (run.get("checkpoint") or {}).get("pretrained")
    if pretrained:  # an imported folder holds the tokenizer copied from the HF source
        candidates.append(Path(pretrained))
    match = ITER.match(p.name)
    return CheckpointSource("training", p, p, model, data, candidates, int(match.group(1)) if match else None)


def _tokenizer_candidates(data: DataConfig) -> List[Path]:
    """Where the run's tokenizer is: ``data.tokenizer_path``, else a ``tokenizer/`` folder in or
    beside the first source (the data pipeline's rule; relative paths from the current folder)."""
    if data.tokenizer_path:
        return [Path(data.tokenizer_path)]
    try:
        specs = data.source_specs()
    except ValueError:
        return []
    if data.is_synthetic or not specs:
        return []
    source = Path(specs[0].path)
    return [source / "tokenizer", source.parent / "tokenizer"]


def _check_complete(p: Path) -> None:
    """The manifest (written last by a save) lists every file with its size and CRC-32."""
    try:
        legacy = read_manifest(p) is None and (p / "trainer.pt").exists()
    except ValueError:
        legacy = False
    if legacy:
        logger.warning("checkpoint %s has no %s (written by an older version): not verified", p, MANIFEST)
        return
    problem = check_files(p, checksums=True)
    if problem is not None:
        raise ConversionError(f"incomplete or damaged checkpoint: {problem}")


def _data_config(raw: dict, where: Path) -> DataConfig:
    """The run's data section (not validated: its shards need not exist where we export)."""
    try:
        return from_dict(DataConfig, raw, "data")
    except ConfigError as exc:
        logger.warning("%s: data section not readable (%s); processor settings use the defaults", where, exc)
        return DataConfig()


def _import_folder(p: Path) -> CheckpointSource:
    weights, model_file = p / WEIGHTS_DIR, p / "model.yaml"
    missing = [x.name for x in (p / ARCHITECTURE_FILE, model_file, weights / METADATA) if not x.exists()]
    if missing:
        raise ConversionError(f"{p} looks like a `casa-convert import-hf` folder but lacks {missing} "
                              "(an interrupted import?); import it again")
    try:
        model = load_config_dict(ModelConfig, read_yaml(model_file))
    except ConfigError as exc:
        raise ConversionError(f"{model_file}: {exc}") from exc
    return CheckpointSource("import", p, weights, model, DataConfig(), [p])

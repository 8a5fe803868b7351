"""What a run saves beside its resolved config, and how a saved run is read back.

The resolved ``config.yaml`` goes into the run directory and into every checkpoint. It names the
chat template (``data.chat_template``) by path, but the template's *text* decides how every
conversation was laid out in tokens: a file edited or deleted after training would silently
change what ``export-hf`` writes as the model's template and how ``casa-eval`` prompts it. So the
text is saved too, as ``chat_template.jinja`` beside ``config.yaml`` (part of a checkpoint's
manifest like any of its files), and whoever reads a saved run uses that copy:

* ``export-hf`` and ``casa-eval`` (``with_saved_template``): the copy replaces the path, with a
  warning when the file at the path now says something else, a note when it is gone;
* a resumed run (``template_drift``, ``tokenizer_drift``): warned that it goes on with another
  template or tokenizer than the checkpoint was trained with (allowed, as any data setting may
  change on resume; a tokenizer grown by ``import-hf --add-tokens`` is one).

Checkpoints written before this copy existed are read as before (the path).

The tokenizer's files are saved into every checkpoint too (``tokenizer/``, as Megatron-Bridge's
``save_tokenizer_assets``; ``checkpoint.save_tokenizer``): ``data.tokenizer_path`` often points
into an import folder or a data set that is moved or deleted long before the model is exported,
and the tokenizer is part of the model. ``export-hf`` and ``casa-eval`` look there first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from casa_megatron.config.loader import save_config
from casa_megatron.config.pretrained import RUN_CONFIG
from casa_megatron.runtime.atomic import atomic_write_text

logger = logging.getLogger(__name__)

TEMPLATE_COPY = "chat_template.jinja"  # the text of data.chat_template, beside config.yaml
TOKENIZER_COPY = "tokenizer"  # the tokenizer's files, in every checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.json", "chat_template.jinja")
_told: set = set()  # (folder, file) pairs already warned about: a tool reads a checkpoint's config more than once


def save_run_config(config: Any, folder: str | Path, tokenizer: bool = False) -> None:
    """``folder/config.yaml`` and, with ``data.chat_template``, ``folder/chat_template.jinja``
    (each written atomically; the template first, so a config never names a copy not yet there);
    with ``tokenizer`` (a checkpoint's unfinished ``.tmp`` folder), ``folder/tokenizer/``."""
    folder = Path(folder)
    data = getattr(config, "data", None)
    if data is not None and data.chat_template:
        atomic_write_text(folder / TEMPLATE_COPY, data.chat_template_text())
    if tokenizer and data is not None:
        copy_tokenizer(data, folder / TOKENIZER_COPY)
    save_config(config, folder / RUN_CONFIG)


def copy_tokenizer(data, out: Path) -> int:
    """The run's tokenizer files (``data.resolved_tokenizer_path()``) into ``out``; how many (0:
    no tokenizer, e.g. the in-memory synthetic task). Only the tokenizer's own files: the folder
    may be an import holding the weights."""
    try:
        source = data.resolved_tokenizer_path()
    except (OSError, ValueError):
        return 0
    if source is None or not Path(source).is_dir():
        return 0
    names = [n for n in TOKENIZER_FILES if (Path(source) / n).is_file()]
    if names:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(Path(source) / name, out / name)
    return len(names)


def tokenizer_drift(data, folder: str | Path) -> Optional[str]:
    """A sentence when this run's tokenizer files differ from those saved in checkpoint ``folder``
    (None when they agree, or the checkpoint kept none): a resume with another tokenizer maps text
    to other ids than the model learnt."""
    saved = saved_tokenizer(folder)
    if saved is None:
        return None
    try:
        current = data.resolved_tokenizer_path()
    except (OSError, ValueError):
        current = None
    if current is None or not Path(current).is_dir():
        return None  # DataConfig.validate names a missing tokenizer
    differ = [n for n in TOKENIZER_FILES if _bytes(Path(current) / n) != _bytes(saved / n)]
    if not differ:
        return None
    return (f"the tokenizer at {current} is not the one {Path(folder).name} was trained with ({saved}; "
            f"{', '.join(differ)} differ): text maps to other ids than the model learnt")


def _bytes(path: Path) -> Optional[bytes]:
    return path.read_bytes() if path.is_file() else None


def saved_tokenizer(folder: str | Path) -> Optional[Path]:
    """The tokenizer saved in checkpoint ``folder``, or None (none saved, or an older checkpoint)."""
    copy = Path(folder) / TOKENIZER_COPY
    return copy if (copy / "tokenizer_config.json").is_file() else None


def _saved_text(folder: Path) -> Optional[str]:
    copy = Path(folder) / TEMPLATE_COPY
    return copy.read_text(encoding="utf-8") if copy.is_file() else None


def with_saved_template(data, folder: str | Path):
    """``data`` (a DataConfig read from ``folder``'s config) with ``chat_template`` pointing at the
    copy saved in ``folder``: the template the model was trained with, whatever happened to the
    file since. Unchanged without a copy (no template, or a checkpoint older than the copy)."""
    folder = Path(folder)
    saved = _saved_text(folder)
    if saved is None or not data.chat_template:
        return data
    original = Path(data.chat_template)
    told = (str(folder.resolve()), str(original))
    try:
        now = original.read_text(encoding="utf-8")
    except OSError:
        now = None
    if now != saved and told not in _told:
        _told.add(told)
        if now is None:
            logger.info("data.chat_template %s is gone; using the copy saved with %s", original, folder)
        else:
            logger.warning("data.chat_template %s changed since %s was saved; using the template the model was "
                           "trained with (%s)", original, folder, folder / TEMPLATE_COPY)
    return dataclasses.replace(data, chat_template=str(folder / TEMPLATE_COPY))


def template_drift(data, folder: str | Path) -> Optional[str]:
    """A sentence when this run's chat template differs from the one saved in checkpoint
    ``folder`` (None when they agree or the checkpoint kept no copy)."""
    saved = _saved_text(Path(folder))
    if saved is None:
        return None
    try:
        now = data.chat_template_text()
    except OSError as exc:
        return f"data.chat_template {data.chat_template!r} cannot be read ({exc})"
    if now == saved:
        return None
    current = f"data.chat_template {data.chat_template!r}" if data.chat_template else "the tokenizer's own template"
    return (f"this run lays text out with {current}, not with the template {Path(folder).name} was trained with "
            f"({Path(folder) / TEMPLATE_COPY}): the model sees a new layout from here on")

"""Output folders that appear complete or not at all (import and export share this).

Everything is written into a hidden sibling ``.OUT.tmp-PID`` that is renamed into place at the
end, so an interrupted conversion never leaves a folder that looks like a checkpoint or a model.
An existing, non-empty ``OUT`` is refused unless ``force``; with it, the old folder is replaced
only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from casa_megatron.conversion.errors import ConversionError


def check_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConversionError(f"output {out} already exists and is not empty (it may hold a checkpoint or "
                              "a model); pass --force to replace it")


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Atomic as far as the filesystem allows: the new folder appears complete or not at all."""
    if out.exists():
        check_output(out, force)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """``with staged_output(OUT, force) as tmp:`` write into ``tmp``; published on success,
    removed on any failure (Ctrl-C included)."""
    out = Path(out)
    check_output(out, force)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

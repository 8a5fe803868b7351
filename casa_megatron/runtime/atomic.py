"""Files and folders that appear complete or not at all: the atomic writes of the package.

Every file a reader may open while it is being written (a resolved config, a checkpoint's
manifest or ``latest`` pointer, a report, a benchmark's JSON, a profiler trace) is written to a
hidden sibling ``.NAME.tmp-PID`` in the same folder, flushed to disk, and renamed over ``NAME``.
A crash or an exception at any point leaves the previous file untouched and removes the partial
one; two processes writing the same name never share a temporary file.

Output folders (an imported checkpoint, an exported model, a folder of data shards) are built the
same way in a hidden sibling folder (:func:`staged_folder`); an existing, non-empty folder is
refused unless ``force``, and even then replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is staged: hidden, same folder (a rename across filesystems is not atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``.

    The callback form serves writers that only take a path (``export_chrome_trace``,
    ``savefig``); :func:`atomic_write_text` and :func:`atomic_write_json` cover the rest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if not tmp.exists():
            raise RuntimeError(f"writing {path}: the writer produced no file")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: PathLike, data: Any, indent: int = 2, **dump_kwargs: Any) -> Path:
    """JSON with a final newline. The text is built before the temporary file is opened, so a value
    that cannot be serialised fails without touching the disk."""
    text = json.dumps(data, indent=indent, **dump_kwargs) + "\n"
    return atomic_write_text(path, text)


def _fsync(path: Path) -> None:
    """Data on disk before the rename makes it visible (otherwise a power cut can leave an empty
    file under the final name on some filesystems)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputExists(ValueError):
    """The output folder exists, is not empty, and ``force`` was not given."""


def check_output(out: PathLike, force: bool, holds: str = "") -> None:
    """Refuse an existing non-empty ``out`` unless ``force``; ``holds`` says what it may hold."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExists(f"output {out} already exists and is not empty{f' ({holds})' if holds else ''}; "
                           "pass --force to replace it")


def publish(tmp: Path, out: Path, force: bool, holds: str = "") -> None:
    """Rename the complete folder ``tmp`` to ``out`` (atomic as far as the filesystem allows: the
    old ``out`` is moved aside, the new one renamed in, then the old one deleted)."""
    if out.exists():
        check_output(out, force, holds)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


@contextmanager
def staged_folder(out: PathLike, force: bool, holds: str = "") -> Iterator[Path]:
    """``with staged_folder(OUT, force) as tmp:`` write into ``tmp``; published on success,
    removed on any failure (Ctrl-C included)."""
    out = Path(out)
    check_output(out, force, holds)
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, out, force, holds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Output folders that appear complete or not at all (import and export share this).

Everything is written into a hidden sibling ``.OUT.tmp-PID`` that is renamed into place at the
end, so an interrupted conversion never leaves a folder that looks like a checkpoint or a model.
An existing, non-empty ``OUT`` is refused unless ``force``; with it, the old folder is replaced
only once the new one is complete. The mechanism is ``runtime/atomic.py``'s; here its refusal
becomes a :class:`ConversionError`, which the conversion CLIs report.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.runtime import atomic

HOLDS = "it may hold a checkpoint or a model"


@contextmanager
def _as_conversion_error() -> Iterator[None]:
    """An existing output refused by ``runtime/atomic`` is a :class:`ConversionError` here."""
    try:
        yield
    except atomic.OutputExists as exc:
        raise ConversionError(str(exc)) from None


def check_output(out: Path, force: bool) -> None:
    with _as_conversion_error():
        atomic.check_output(out, force, HOLDS)


def publish(tmp: Path, out: Path, force: bool) -> None:
    with _as_conversion_error():
        atomic.publish(tmp, out, force, HOLDS)


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """``with staged_output(OUT, force) as tmp:`` write into ``tmp``; published on success,
    removed on any failure (Ctrl-C included)."""
    with _as_conversion_error(), atomic.staged_folder(out, force, HOLDS) as tmp:
        yield tmp

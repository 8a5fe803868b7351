"""Files named by the locations a user gives: folders of them and the files themselves."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union


def files_in(locations: Sequence[Union[str, Path]], suffix: str, recursive: bool = False,
             strict: bool = True) -> List[Path]:
    """Every ``*<suffix>`` file of the folders given (sorted by name; ``recursive``: below them)
    and the ``<suffix>`` files given, in that order, each once. ``strict``: anything else is a
    ``FileNotFoundError`` naming it; else it is left out (left to whoever reads it to refuse)."""
    out: List[Path] = []
    for location in map(Path, locations):
        if location.is_dir():
            out.extend(sorted(location.rglob(f"*{suffix}") if recursive else location.glob(f"*{suffix}")))
        elif location.suffix == suffix and location.is_file():
            out.append(location)
        elif strict:
            raise FileNotFoundError(f"{location}: neither a folder of *{suffix} files nor a {suffix} file")
    return list(dict.fromkeys(out))

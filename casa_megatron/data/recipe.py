"""Data recipes as LLaVA-OneVision / LLaVA-NeXT write them, and the subsets they select.

A recipe is a YAML file listing annotation files, each with a sampling strategy::

    datasets:
      - json_path: llava_onevision/ai2d_gpt4v.json
        sampling_strategy: all          # every sample
      - json_path: llava_onevision/chart2text.json
        sampling_strategy: "first:10%"  # the first 10 % (rounded up), or "first:1000"
      - json_path: llava_onevision/vision_flan.json
        sampling_strategy: "random:5000"  # 5,000 samples drawn once ("end:N" / "end:P%": the last ones)
        media_root: /data/images          # ours, optional: where its relative media paths point

Given as a source (``data.source: recipe.yaml``, or an entry of ``data.sources`` / ``data.valid``
with ``path: recipe.yaml``), it becomes one blended source per dataset, each weighted by the
number of samples it selects: LLaVA concatenates the selections into one list, so every selected
sample is equally likely, which is what size-proportional weights give (the blend keeps every
prefix within one sample of those proportions; ``blend.py``). The recipe's own ``weight``
scales its datasets together against the other sources.

Differences from LLaVA's loader, on purpose: ``random:`` draws its samples once, seeded by the
file's name and the count (LLaVA shuffles with Python's unseeded ``random``: another selection
each run, and a resumed run would read another data set); relative ``json_path`` values are
relative to the recipe's folder (LLaVA: to the working directory of the training script);
``json_path`` may also name any source we read (a shard folder, a ``.tar``, a manifest: ``path``
is accepted as well); a subset strategy may also be given to a plain source
(``{path: x.json, subset: "first:10%"}``).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import replace
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

RECIPE_SUFFIXES = (".yaml", ".yml")
_STRATEGY = re.compile(r"^(all)$|^(first|end|random):(\d+(?:\.\d+)?%|\d+)$")
_ENTRY_KEYS = {"json_path", "path", "sampling_strategy", "media_root"}


class RecipeError(ValueError):
    """A recipe or subset that cannot be read (the message names the file, the entry and why)."""


def is_recipe(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in RECIPE_SUFFIXES


def check_strategy(strategy: object, where: str) -> str:
    """``all``, ``first:N``, ``first:P%``, ``end:...``, ``random:...`` (N >= 1, 0 < P <= 100)."""
    match = _STRATEGY.match(strategy) if isinstance(strategy, str) else None
    if match is None:
        raise RecipeError(f"{where}: sampling strategy {strategy!r} is not 'all', 'first:N', 'end:N' or "
                          "'random:N' (N a count, or a percentage such as 10%)")
    if match.group(3):
        amount = match.group(3)
        value = float(amount[:-1]) if amount.endswith("%") else int(amount)
        if value <= 0 or (amount.endswith("%") and value > 100):
            raise RecipeError(f"{where}: sampling strategy {strategy!r} selects nothing or more than everything")
    return strategy


def subset_count(strategy: str, size: int) -> int:
    """How many of ``size`` samples ``strategy`` selects (a percentage rounded up, as LLaVA does;
    a count larger than the data set selects all of it, as Python's slicing does there)."""
    if strategy == "all":
        return size
    amount = strategy.split(":", 1)[1]
    if amount.endswith("%"):
        return min(size, math.ceil(float(amount[:-1]) * size / 100))
    return min(size, int(amount))


def subset_indices(strategy: str, size: int, name: str) -> Union[range, np.ndarray]:
    """The sample indices ``strategy`` selects from a source of ``size`` samples called ``name``,
    in storage order (``random``: drawn without replacement, seeded by ``name`` and the count)."""
    count = subset_count(strategy, size)
    kind = strategy.split(":", 1)[0]
    if kind in ("all", "first"):
        return range(count)
    if kind == "end":
        return range(size - count, size)
    rng = np.random.default_rng([zlib.crc32(name.encode()), count])
    return np.sort(rng.choice(size, size=count, replace=False))


def read_recipe(path: Union[str, Path]) -> List[Tuple[str, str, str]]:
    """(source path, sampling strategy, media root or "") of each dataset of a recipe file."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"data recipe {path}: cannot be read ({e})") from e
    datasets = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise RecipeError(f"data recipe {path}: expected a non-empty 'datasets' list (LLaVA-OneVision's format: "
                          "datasets: [{json_path: ..., sampling_strategy: all}, ...])")
    out = []
    for i, entry in enumerate(datasets):
        where = f"data recipe {path}, datasets[{i}]"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: expected {{json_path, sampling_strategy}}, got {entry!r}")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise RecipeError(f"{where}: unknown keys {unknown} (known: {sorted(_ENTRY_KEYS)})")
        source = entry.get("json_path", entry.get("path"))
        if not isinstance(source, str) or not source:
            raise RecipeError(f"{where}: no json_path")
        source_path = Path(source) if Path(source).is_absolute() else path.parent / source
        if not source_path.exists():
            raise RecipeError(f"{where}: {source_path} does not exist")
        if is_recipe(source_path):
            raise RecipeError(f"{where}: {source_path} is a recipe itself (recipes do not nest)")
        strategy = check_strategy(entry.get("sampling_strategy", "all"), where)
        media_root = entry.get("media_root") or ""
        if media_root and not Path(media_root).is_absolute():
            media_root = str(path.parent / media_root)
        out.append((str(source_path), strategy, media_root))
    return out


def expand(specs: Sequence) -> List:
    """``SourceSpec``s with every recipe replaced by one spec per dataset (``subset`` its sampling
    strategy, ``media_root`` its own or the recipe's); the weights are set by ``weigh``."""
    out = []
    for spec in specs:
        if not is_recipe(spec.path):
            out.append(spec)
            continue
        for source, strategy, media_root in read_recipe(spec.path):
            out.append(replace(spec, path=source, subset=strategy, media_root=media_root or spec.media_root,
                               recipe=spec.path))
    return out


def weigh(specs: Sequence, sizes: Sequence[int]) -> List:
    """The datasets of each recipe weighted by their selected sample counts (``sizes``), together
    the recipe's own weight; other sources keep theirs."""
    totals: dict = {}
    for spec, size in zip(specs, sizes):
        if spec.recipe:
            totals[spec.recipe] = totals.get(spec.recipe, 0) + size
    return [replace(spec, weight=spec.weight * size / totals[spec.recipe]) if spec.recipe else spec
            for spec, size in zip(specs, sizes)]

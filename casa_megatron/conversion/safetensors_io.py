"""Stream tensors out of a Hugging Face folder, one at a time.

Reads ``model.safetensors`` or the shards named by ``model.safetensors.index.json``. Shapes
and dtypes come from the safetensors headers (nothing is loaded to plan an import); a tensor
is read only when asked for, so an import holds one model (the megatron one) plus the few HF
tensors of the current mapping row.

Two key layouts are accepted and normalised to the hub one: ``model.layers.*`` / ``visual.*``
(the hub, and what transformers writes on save) and transformers >= 4.52's in-memory layout
``model.language_model.*`` / ``model.visual.*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open

from casa_megatron.conversion.errors import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# transformers >= 4.52 layout -> hub layout (first matching prefix wins)
LAYOUT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def normalise(name: str) -> str:
    for old, new in LAYOUT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class SafetensorsReader:
    """``reader.shape(name)``, ``reader.get(name)`` by hub-layout name; ``names()`` lists all."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = self._files()
        self._where: Dict[str, Tuple[Path, str]] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._dtypes: Dict[str, str] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    name = normalise(key)
                    if name in self._where:
                        raise ConversionError(f"{self.folder}: tensor {name!r} appears twice "
                                              f"({self._where[name][1]} and {key})")
                    piece = handle.get_slice(key)
                    self._where[name] = (file, key)
                    self._shapes[name] = tuple(piece.get_shape())
                    self._dtypes[name] = piece.get_dtype()

    def _files(self) -> List[Path]:
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map'")
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{index} names shard files that do not exist: {missing}")
            return files
        if (self.folder / SINGLE).exists():
            return [self.folder / SINGLE]
        found = sorted(self.folder.glob("*.safetensors"))
        if not found:
            raise ConversionError(f"{self.folder}: no {SINGLE}, no {INDEX} and no *.safetensors file")
        return found

    def names(self) -> List[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its file; the file is closed again, so its mapped pages
        never pile up in this process's memory while the whole checkpoint is streamed."""
        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

class DictReader:
    """The reader interface over in-memory tensors (tests, and round trips without files)."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self._tensors = {normalise(k): v for k, v in tensors.items()}

    def names(self) -> List[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._tensors[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


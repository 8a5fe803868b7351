"""Stream tensors out of a Hugging Face folder, one at a time, and into one.

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
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


class WrappedReader:
    """A reader that changes some tensors of another on the way out (a merged adapter, an
    extended vocabulary): everything is the inner reader's unless a subclass overrides
    ``get`` (and ``shape`` where the shape changes)."""

    def __init__(self, reader):
        self.reader = reader

    def names(self) -> List[str]:
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.reader.shape(name)

    def dtype(self, name: str) -> str:
        return self.reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)


# --- writing ----------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class TensorUnit:
    """HF tensors produced together (the outputs of one mapping row): their names and shapes are
    known before any data exists, so a shard's header is written first and the tensors are
    produced, written and dropped one unit at a time."""

    names: Sequence[str]
    shapes: Sequence[Tuple[int, ...]]
    dtype: torch.dtype
    produce: Callable[[], Sequence[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(size * _numel(s) for s in self.shapes)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def units_from_tensors(tensors: Dict[str, torch.Tensor]) -> List[TensorUnit]:
    return [TensorUnit([n], [tuple(t.shape)], t.dtype, (lambda t=t: [t])) for n, t in tensors.items()]


def parse_size(size) -> int:
    """``"2GB"``, ``"500MB"``, ``"40KB"`` (powers of 10, as huggingface_hub) or a number of bytes."""
    if isinstance(size, int):
        return size
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    raise ConversionError(f"max shard size {size!r}: expected a number of bytes or e.g. '2GB'")


def _shards(units: Sequence[TensorUnit], max_bytes: int) -> List[List[TensorUnit]]:
    """Consecutive units per shard, each shard at most ``max_bytes`` unless one unit is larger."""
    shards: List[List[TensorUnit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return [s for s in shards if s]


def write_safetensors_shards(folder: Path, units: Sequence[TensorUnit], max_shard_size="2GB",
                             progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """Write ``model.safetensors`` (one shard) or ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, the layout transformers writes and reads. Each tensor's
    bytes go straight to the file (no serialised copy of a shard in memory): peak memory is the
    unit being written. ``progress(n_tensors)`` is called after each unit. Returns the file names."""
    shards = _shards(list(units), parse_size(max_shard_size))
    names = [SINGLE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                              for k in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        total += _write_shard(folder / name, shard, progress)
        weight_map.update({t: name for unit in shard for t in unit.names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_shard(path: Path, units: Sequence[TensorUnit], progress) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for unit in units:
        if unit.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{unit.names[0]}: dtype {unit.dtype} cannot be stored in safetensors")
        size = torch.empty(0, dtype=unit.dtype).element_size()
        for name, shape in zip(unit.names, unit.shapes):
            end = offset + size * _numel(shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[unit.dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for unit in units:
            tensors = unit.produce()
            for name, shape, tensor in zip(unit.names, unit.shapes, tensors, strict=True):
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != unit.dtype:
                    raise ConversionError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                                          f"planned {tuple(shape)} {unit.dtype}")
                data = tensor.detach().cpu().contiguous().reshape(-1)
                f.write(memoryview(data.view(torch.uint8).numpy()))
            del tensors
            if progress is not None:
                progress(len(unit.names))
    return offset

"""The streaming safetensors writer of ``export-hf`` against the safetensors library's reader:
every dtype a model holds, scalars, empty tensors, non-contiguous inputs, shards + index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.safetensors_io import (TensorUnit, parse_size, units_from_tensors,
                                                     write_safetensors_shards)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.f32": torch.randn(3, 5, generator=g), "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.f16": torch.randn(2, 2, generator=g).half(), "d.i64": torch.arange(6).view(2, 3),
            "e.bool": torch.tensor([True, False, True]), "f.scalar": torch.tensor(1.5),
            "g.empty": torch.zeros(0, 4), "h.transposed": torch.randn(4, 6, generator=g).t()}


def test_single_file_reads_back_bit_exact(tmp_path):
    tensors = _tensors()
    names = write_safetensors_shards(tmp_path, units_from_tensors(tensors))
    assert names == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    calls = []
    names = write_safetensors_shards(tmp_path, units_from_tensors(tensors), max_shard_size=3000,
                                     progress=calls.append)
    assert names == [f"model-0000{k}-of-00005.safetensors" for k in range(1, 6)]  # 2 x 1 KiB <= 3000 B each
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 1024 and sum(calls) == 10
    back = {}
    for name in names:
        shard = load_file(str(tmp_path / name))
        assert all(index["weight_map"][k] == name for k in shard)
        back.update(shard)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_unit_that_lies_about_its_shape_is_refused(tmp_path):
    unit = TensorUnit(["x"], [(2, 2)], torch.float32, lambda: [torch.zeros(3)])
    with pytest.raises(ConversionError, match=r"internal: x is \(3,\) torch.float32, planned \(2, 2\)"):
        write_safetensors_shards(tmp_path, [unit])


def test_sizes():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("40KB") == 40_000 and parse_size(123) == 123
    with pytest.raises(ConversionError, match="expected a number of bytes"):
        parse_size("lots")

"""Split full (TP=1) tensors into tensor-parallel shards and merge shards back.

megatron tags every TP-sharded parameter with ``partition_dim`` and ``partition_stride``
(stride 2 for the SwiGLU ``linear_fc1``, whose shards hold ``[gate_r; up_r]``). These two
functions invert each other using those tags; they serve layout-equivalence tests and the
Hugging Face converters.
"""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch
import torch.distributed as dist
from torch import Tensor


def tp_meta(param: Tensor):
    """(is_sharded, dim, stride) of a parameter."""
    if not getattr(param, "tensor_model_parallel", False):
        return False, -1, 1
    return True, param.partition_dim, getattr(param, "partition_stride", 1)


def split_full(full: Tensor, dim: int, stride: int, rank: int, size: int) -> Tensor:
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def merge_shards(shards: List[Tensor], dim: int, stride: int) -> Tensor:
    size = len(shards)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(size)], dim=dim)


@torch.no_grad()
def load_full_state(model: torch.nn.Module, full: Mapping[str, Tensor], rank: int, size: int) -> None:
    """Copy full tensors (keyed like ``model.named_parameters()``) into this rank's shards."""
    for name, param in model.named_parameters():
        if name not in full:
            raise KeyError(f"full state has no tensor for parameter {name!r}")
        sharded, dim, stride = tp_meta(param)
        value = split_full(full[name], dim, stride, rank, size) if sharded else full[name]
        if value.shape != param.shape:
            raise ValueError(f"{name}: shard shape {tuple(value.shape)} != parameter {tuple(param.shape)}")
        param.copy_(value)


def gather_full(model: torch.nn.Module, local: Mapping[str, Tensor], group) -> Dict[str, Tensor]:
    """All-gather this rank's tensors (e.g. grads, keyed like parameters) into full tensors."""
    params = dict(model.named_parameters())
    size = dist.get_world_size(group)
    out = {}
    for name, tensor in local.items():
        sharded, dim, stride = tp_meta(params[name])
        if not sharded or size == 1:
            out[name] = tensor.clone()
            continue
        shards = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        out[name] = merge_shards(shards, dim, stride)
    return out

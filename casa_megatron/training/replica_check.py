"""Data-parallel replicas hold the same weights (``check_weights_across_dp_interval``,
Megatron-LM's ``--check-weight-hash-across-dp-replicas-interval``).

Every data-parallel rank applies the same averaged gradients to the same weights, so the
replicas stay bit-identical. When they do not (a non-deterministic kernel writing to the
weights, a faulty GPU or link, a bug in a sharded update), nothing else notices: each replica
trains on, its loss looks fine, and whichever copy is saved is a different model from the one
the other ranks run. This check hashes every weight on every rank and compares the hashes over
the data-parallel group; a difference stops the run, naming the step and the weights.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class ReplicasDiverged(RuntimeError):
    """Data-parallel replicas hold different weights."""


def weight_hashes(chunks) -> Dict[str, str]:
    """SHA-256 of each weight's bytes on this rank, by ``<chunk>.<name>``."""
    out = {}
    for i, chunk in enumerate(chunks):
        for name, param in getattr(chunk, "module", chunk).named_parameters():  # inside megatron's DDP
            data = param.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
            out[f"{i}.{name}"] = hashlib.sha256(data.tobytes()).hexdigest()
    return out


def check_replicas(chunks, step: int) -> None:
    """Collective over the data-parallel group; raises ``ReplicasDiverged`` on every rank of it
    when any weight differs between its replicas."""
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    mine = weight_hashes(chunks)
    everyone: List[Dict[str, str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differ = sorted(name for name in mine if len({hashes[name] for hashes in everyone}) > 1)
    if differ:
        raise ReplicasDiverged(f"step {step}: data-parallel replicas hold different values of {len(differ)} weights "
                               f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); the run stops here, "
                               f"its checkpoints were saved from data-parallel rank 0")

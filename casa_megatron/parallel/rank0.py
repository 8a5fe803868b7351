"""Work that one rank does for all: read or check once on global rank 0, share the outcome.

Shared by the run session (lock and run-directory checks) and the checkpointer (reading the
data-loader states of a checkpoint), which is why it lives below both.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def on_rank0(fn: Callable[[], T], share: bool = False) -> Optional[T]:
    """Run ``fn`` on global rank 0 only; its exception (if any) is raised on every rank. Its
    result is returned on rank 0, and on every rank with ``share`` (in the same broadcast)."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if dist.get_world_size() > 1:
        box = [error, result if share else None]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        result = box[1] if share else result
    if error is not None:
        raise error
    return result

"""Run a function in N forked processes joined by a gloo process group.

Forking (not spawning) lets children reuse the parent's already-imported megatron-core
(importing it costs ~20 s per process on the 2-core CI machine). The parent never initialises
torch.distributed itself, so every child starts clean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable, List


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(obj):
    """Tensors go back as numpy arrays: torch's shared-memory pickling dies with the child."""
    import torch

    if torch.is_tensor(obj):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _worker(fn, rank, world_size, port, queue, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import gc

    import torch

    # the parent's objects (the whole pytest session: collected tests, imported libraries) move to
    # the permanent generation: megatron's explicit gc.collect() calls (one per checkpoint save)
    # then walk only what this child made (~1 s less per save late in the session)
    gc.freeze()
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", _portable(fn(rank, world_size, **kwargs))))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, timeout: float = 900, **kwargs) -> List[Any]:
    """Return ``[fn(rank, world_size, **kwargs) for each rank]``; re-raise any child's failure."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world_size):
        rank, status, payload = _get(queue, procs, timeout)
        (results.__setitem__(rank, payload) if status == "ok" else errors.append(f"rank {rank}:\n{payload}"))
        if errors:
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _get(queue, procs, timeout):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not queue.empty():
            return queue.get()
        if all(not p.is_alive() for p in procs) and queue.empty():
            raise AssertionError("all distributed workers exited without reporting (crash?)")
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"distributed workers timed out after {timeout} s")

"""Initialise torch.distributed and megatron-core's model-parallel state.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR from the environment) and as a
plain single process (world size 1 on a free local port). Without a GPU it turns on
:mod:`casa_megatron.compat.cpu` and uses gloo.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from casa_megatron.compat import enable_cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank (the interleaved
    schedule), None without."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = enable_cpu_compat()
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "gloo" if on_cpu else "nccl"
        if "RANK" in os.environ:  # torchrun / srun: the launcher's env:// rendezvous
            dist.init_process_group(backend=backend)
        else:
            # One process without a launcher: a private TCP rendezvous, written nowhere in
            # os.environ -- a child process started later (a benchmark's per-fusion process, a
            # tool) must not inherit RANK / MASTER_PORT and try to join or bind this group's port.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()

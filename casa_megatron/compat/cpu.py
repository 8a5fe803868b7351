"""Run real megatron-core on a machine without a GPU (CPU tensors, gloo collectives).

megatron-core 0.16.1 assumes CUDA in three ways, and this module redirects each of them to the
CPU. Nothing numeric is replaced: the layers, mappings, schedules and optimizers that run are
megatron-core's own; only *where tensors live* and *which RNG is forked* change.

1. ``torch.cuda.current_device()`` is used as a device for new tensors (p2p shapes, SP
   all-gather buffers, grad buffers). It returns ``torch.device("cpu")`` here.
2. Literal ``device="cuda"`` / ``.cuda()`` appear in the schedules (token counters), the
   optimizer (found-inf flags, grad-norm buffers) and the grad buffers. A ``TorchFunctionMode``
   rewrites any CUDA device argument of a torch call to the CPU (the same mechanism torch uses
   for ``torch.set_default_device``). ``torch.cuda.synchronize`` becomes a no-op. The same mode
   answers ``tensor.type()`` with the CUDA type name (``torch.cuda.FloatTensor``), because
   megatron's optimizers select fp32/fp16 handling by comparing those strings.
3. The model-parallel RNG tracker forks the CUDA generator (dropout in TP regions, GPU weight
   init). Here it forks the CPU default generator instead, with the same seeds megatron uses.

It is switched on only when ``torch.cuda.is_available()`` is False, and only by
:func:`enable_cpu_compat` (called by :mod:`casa_megatron.parallel.init`). On a GPU machine the
call is a no-op, so GPU runs use megatron-core unmodified.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:<int>" to torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers check dtypes as `t.type() == "torch.cuda.FloatTensor"`.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # The CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    # fork() warns when the CPU generator moved inside a fork; on CPU the forked generator *is*
    # the CPU generator, so the warning is always a false alarm here.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)


def enable_cpu_compat() -> bool:
    """Turn the CPU redirections on if (and only if) no GPU is present. Idempotent.

    Returns True when the compatibility layer is active.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _enabled:
            _patch_torch_cuda()
            _patch_megatron_rng()
            # Pushed once for the process: the mode stays on the main thread's mode stack.
            _CudaToCpuMode().__enter__()
            _enabled = True
    return True


def cpu_compat_enabled() -> bool:
    return _enabled

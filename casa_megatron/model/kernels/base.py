"""Shared pieces of the packed window-attention backends.

Every backend computes the same thing: for each window ``w`` the queries
``q[cu_q[w]:cu_q[w+1]]`` attend to ``k/v[cu_kv[w]:cu_kv[w+1]]``, optionally with
a causal mask aligned to the bottom-right corner of the window's score matrix.
Input validation, backend selection and the "windows without keys output
zeros" rule live here so that the three backends cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "flash", "te", "torch_varlen")
HALF_DTYPES = (torch.float16, torch.bfloat16)

logger = logging.getLogger(__name__)
_LOGGED_CHOICES: set = set()


def flash_available() -> bool:
    """True if flash-attn (2.x, with varlen kernels) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def te_available() -> bool:
    """True if Transformer Engine's PyTorch frontend can be imported."""
    try:
        return importlib.util.find_spec("transformer_engine.pytorch") is not None
    except ModuleNotFoundError:  # parent package missing
        return False


def torch_varlen_available() -> bool:
    """True if this torch has ``torch.nn.attention.varlen`` (>= 2.10; its kernels are CUDA-only)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Map ``backend`` (possibly "auto") to a concrete backend name.

    "auto" prefers the fused GPU kernels -- flash-attn, then Transformer Engine, then PyTorch's
    own flash varlen (``torch_varlen``, no extra package) -- but only where they apply: CUDA
    tensors in fp16/bf16. Anything else falls back to the padded torch path, which runs
    everywhere. The first time each choice is made it is logged (``logging``, INFO), so a run's
    log says which kernel it used and why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown window-attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not q.is_cuda:
        chosen, why = "torch", "tensors are not on a CUDA device"
    elif q.dtype not in HALF_DTYPES:
        chosen, why = "torch", f"{q.dtype} (the fused kernels need fp16/bf16)"
    elif flash_available():
        chosen, why = "flash", "flash-attn is installed"
    elif te_available():
        chosen, why = "te", "Transformer Engine is installed (flash-attn is not)"
    elif torch_varlen_available():
        chosen, why = "torch_varlen", "torch.nn.attention.varlen (neither flash-attn nor TE is installed)"
    else:
        chosen, why = "torch", "no fused varlen kernel is installed"
    _log_choice(chosen, why)
    return chosen


def _log_choice(chosen: str, why: str) -> None:
    if chosen not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(chosen)
        logger.info("window attention backend 'auto' -> %r: %s", chosen, why)


def check_window_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
) -> None:
    """Validate packed ``thd`` shapes and window boundaries; raise ValueError.

    The cu_seqlens *values* are only checked when they live on the CPU, so the
    GPU hot path stays free of host syncs.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "window attention expects packed [tokens, heads, head_dim] tensors, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_kv.shape:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_kv must be 1-D with one entry per window plus one, got "
            f"shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_kv.shape)}"
        )
    if cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens must hold at least the leading 0")
    if cu_seqlens_q.is_cuda or cu_seqlens_kv.is_cuda:
        return  # reading the values back would cost a device sync in every layer
    last_q, last_kv = int(cu_seqlens_q[-1]), int(cu_seqlens_kv[-1])
    if last_q != q.shape[0] or last_kv != k.shape[0]:
        raise ValueError(
            f"cu_seqlens do not cover the packed tensors: cu_seqlens_q ends at {last_q} for "
            f"{q.shape[0]} queries, cu_seqlens_kv ends at {last_kv} for {k.shape[0]} keys"
        )


def query_window_ids(cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """[W+1] cumulative lengths -> [tq] window index of every packed query."""
    seqlens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.long)  # [W]
    windows = torch.arange(seqlens.numel(), device=cu_seqlens_q.device)
    return torch.repeat_interleave(windows, seqlens, output_size=total_q)  # [tq]


def zero_keyless_windows(
    out: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor
) -> torch.Tensor:
    """Force exactly-zero output for queries of windows that have no keys.

    Vanilla cross-attention relies on text in an imageless window receiving
    exactly zero. Fused kernels generally do this already, but the contract is
    ours, so it is enforced explicitly. ``torch.where`` (not multiplication)
    keeps a possible NaN in a discarded row from leaking into the result.
    """
    kv_len = (cu_seqlens_kv[1:] - cu_seqlens_kv[:-1]).to(torch.long)  # [W]
    has_keys = (kv_len > 0)[query_window_ids(cu_seqlens_q, out.shape[0])]  # [tq]
    return torch.where(has_keys[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def default_scale(head_dim: int, softmax_scale: Optional[float]) -> float:
    return float(softmax_scale) if softmax_scale is not None else head_dim**-0.5


def require_cuda_half(backend: str, q: torch.Tensor) -> None:
    """The fused GPU backends take CUDA fp16/bf16 tensors only; say so by name."""
    if not q.is_cuda:
        raise ValueError(f"window attention backend {backend!r} needs CUDA tensors; use backend='torch' on CPU")
    if q.dtype not in HALF_DTYPES:
        raise ValueError(f"window attention backend {backend!r} needs fp16/bf16 inputs, got {q.dtype}")


def nothing_to_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seqlen_kv: int) -> Optional[torch.Tensor]:
    """Zeros (still connected to k and v in the graph) when no query has any key, else None."""
    if int(max_seqlen_kv) == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum())
    return None

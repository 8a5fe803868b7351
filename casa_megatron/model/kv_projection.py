"""Image tokens through the K/V rows of a fused QKV projection only.

CASA keeps megatron's fused QKV weight (grouped layout ``[ng, (np/ng + 2), hn]`` rows per TP
rank) so that initialising from self-attention is a copy, sharing is a reference and the Hugging
Face mapping is self-attention's. Image tokens are keys/values only, so running the whole fused
GEMM on them computes queries that are thrown away: ``np / (np + 2 ng)`` of that GEMM, 80 % at
Qwen2.5-3B's GQA (16 query heads, 2 groups). This module runs only the K/V rows.

How, and why this way (megatron-core 0.16.1):
- ``ColumnParallelLinear.forward(weight=...)`` refuses a weight of another shape, and the K/V
  rows are not contiguous in the grouped layout (they interleave with each group's Q rows), so
  the rows are gathered with ``index_select`` -- a differentiable op of the real parameter.
- The GEMM is megatron's own ``linear_with_grad_accumulation_and_async_allreduce`` (or
  ``linear_with_frozen_weight`` for a frozen weight, as ``ColumnParallelLinear`` chooses), called
  with the communication flags ``ColumnParallelLinear`` would use: under sequence parallelism it
  all-gathers the image shard in forward and reduce-scatters its gradient in backward, saving
  only the local shard (exactly the fused call's communication); without SP it all-reduces the
  input gradient over TP.
- Gradient bookkeeping: the K/V weight gradient flows back through ``index_select`` into the
  parameter, where autograd sums it with the text call's gradient before the parameter's
  ``AccumulateGrad`` runs -- and that is where megatron DDP's backward hook adds ``param.grad``
  into ``param.main_grad`` (``grad_added_to_main_grad`` stays False). So DDP, its grad buffers
  and the distributed optimizer see one complete gradient, as with the fused call. With
  ``gradient_accumulation_fusion`` the text call would write into ``main_grad`` itself and return
  a dummy gradient, and the image gradient would be dropped by the DDP hook: that combination is
  refused (our configs never set it).
- Quantised primary weights (TE FP8 parameters) cannot be row-sliced: the fused call is used.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import (
    linear_with_frozen_weight,
    linear_with_grad_accumulation_and_async_allreduce,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


def kv_rows(groups: int, per_group: int, head_dim: int, device) -> Tensor:
    """Row indices of the K and V blocks in a local grouped QKV weight, in ``[ng, (k, v), hn]`` order."""
    width = (per_group + 2) * head_dim  # rows per group: np/ng query heads, one key, one value
    offsets = torch.arange(2 * head_dim, device=device)  # [2*hn]: the key rows then the value rows
    starts = torch.arange(groups, device=device) * width + per_group * head_dim  # [ng]
    return (starts[:, None] + offsets[None, :]).reshape(-1)  # [ng*2*hn]


def supports_kv_only(linear: torch.nn.Module) -> bool:
    """A plain weight tensor (not a quantised TE parameter) and no norm fused into the linear."""
    weight = getattr(linear, "weight", None)
    return (isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor
            and not hasattr(linear, "layer_norm_weight"))


def project_kv(linear: torch.nn.Module, x: Tensor, groups: int, per_group: int, head_dim: int,
               config: TransformerConfig, tp_group) -> Tuple[Tensor, Tensor]:
    """x [n(/tp), b, h] through the K/V rows of ``linear`` (a fused QKV column-parallel linear).

    Returns k, v [n, b, ng, hn] (gathered along the sequence under SP, like the fused call).
    """
    if config.gradient_accumulation_fusion:
        raise ValueError("the K/V-only image projection does not support gradient_accumulation_fusion "
                         "(the image weight gradient would bypass main_grad); set "
                         "model.fusion.image_kv_only=false")
    weight = linear.weight
    rows = kv_rows(groups, per_group, head_dim, weight.device)
    w_kv = weight.index_select(0, rows)  # [ng*2*hn, h]
    bias = _bias(linear)
    b_kv = bias.index_select(0, rows) if bias is not None else None
    tp = tp_group.size() if tp_group is not None else 1
    sequence_parallel = bool(config.sequence_parallel) and tp > 1
    allreduce_dgrad = tp > 1 and not sequence_parallel
    linear_fn = (linear_with_grad_accumulation_and_async_allreduce if weight.requires_grad
                 else linear_with_frozen_weight)
    out = linear_fn(input=x, weight=w_kv, bias=b_kv, gradient_accumulation_fusion=False,
                    allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                    tp_group=tp_group)  # [n, b, ng*2*hn]
    n, b = out.shape[:2]
    k, v = out.view(n, b, groups, 2 * head_dim).split(head_dim, dim=3)  # [n, b, ng, hn] each
    return k, v


def _bias(linear: torch.nn.Module) -> Optional[Tensor]:
    """The bias the fused call adds to its output (None when absent or returned separately)."""
    bias = getattr(linear, "bias", None)
    returned_separately = getattr(linear, "skip_bias_add", False) or getattr(linear, "te_return_bias", False)
    if not isinstance(bias, torch.Tensor) or bias.numel() == 0 or returned_separately:
        return None
    return bias

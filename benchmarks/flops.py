"""FLOPs of what a training step actually runs, for MFU (``benchmarks/gpu_check.py`` part f).

Two terms, because fused attention kernels (flash-attn, Transformer Engine) are invisible to
PyTorch's FLOP counter while every GEMM of our layers is not:

- GEMMs: ``torch.utils.flop_counter.FlopCounterMode`` around one real training step (forward and
  backward of every micro-batch) of the local-spec model, keeping only the matrix-multiply ops
  (``mm``, ``addmm``, ``bmm``, ``baddbmm``). What runs is what is counted: the K/V-only image
  projection, frozen weights without a weight gradient, the projector, the output layer.
- Attention: from the micro-batch's own bookkeeping (the cu_seqlens the kernels receive), the
  visible (query, key) pairs of every attention layer -- causal within each packed sample for
  self-attention (the insertion stream's samples, padding included, for insertion), the window's
  images plus its causal text for CASA, the window's images for cross-attention -- times
  ``4 * head_dim * query_heads`` forward (QK^T and PV) and twice that backward. Backward
  recomputation inside flash kernels is not counted (model FLOPs, as MFU is usually defined).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from casa_megatron.config.schema import ModelConfig
from casa_megatron.model.batch import VLMBatch

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def causal_pairs(lengths: torch.Tensor) -> int:
    """Visible pairs of causal self-attention over sequences of these lengths."""
    lengths = lengths.long()
    return int((lengths * (lengths + 1) // 2).sum())


def bottom_right_pairs(q_lens: torch.Tensor, kv_lens: torch.Tensor) -> int:
    """Visible pairs when query i of a window sees keys j <= i + nk - nq (CASA: images first)."""
    q, k = q_lens.long(), kv_lens.long()
    return int((q * (k - q) + q * (q + 1) // 2).sum())


def attention_pairs(model: ModelConfig, batch: VLMBatch, image_seq_length: int) -> Dict[str, int]:
    """{"self_attention": pairs summed over its layers, "fusion": same for CASA / cross-attention}."""
    from casa_megatron.model.packed_attention import packed_seq_params, segment_starts
    from casa_megatron.model.vision import tokens_per_image

    b, s = batch.shape
    layers, fusion = model.lm.num_layers, model.fusion
    counts = tokens_per_image(batch.image_grid_hw, model.vision.spatial_merge_size)
    if fusion.mechanism == "insertion":
        from casa_megatron.model.insertion import build_insertion_layout

        layout = build_insertion_layout(b, s, image_seq_length, batch.image_rows, batch.image_positions,
                                        counts, batch.position_ids, batch.sample_starts)
        cu = packed_seq_params(segment_starts(layout.segment_ids)).cu_seqlens_q
        return {"self_attention": layers * causal_pairs(cu[1:] - cu[:-1]), "fusion": 0}
    from casa_megatron.model.batch import window_start_marks
    from casa_megatron.model.packed_attention import params_from_sample_starts
    from casa_megatron.model.windows import build_windows

    cu = params_from_sample_starts(batch.sample_starts, b, s, "cpu").cu_seqlens_q
    fused = len(fusion.fusion_layers(layers))
    sa_layers = layers - (fused if fusion.placement == "replace" else 0)
    windows = build_windows(b, s, batch.image_rows, batch.image_positions, counts,
                            window_starts=window_start_marks(batch), position_ids=batch.position_ids)
    nq = windows.cu_seqlens_q[1:] - windows.cu_seqlens_q[:-1]
    n_img = windows.cu_seqlens_image[1:] - windows.cu_seqlens_image[:-1]
    if fusion.mechanism == "casa":
        per_layer = bottom_right_pairs(nq, nq + n_img)
    else:
        per_layer = int((nq.long() * n_img.long()).sum())
    return {"self_attention": sa_layers * causal_pairs(cu[1:] - cu[:-1]), "fusion": fused * per_layer}


def attention_flops(model: ModelConfig, pairs: int) -> int:
    """Forward (QK^T, PV: 4 * d * heads per pair) plus backward (twice the forward)."""
    return 3 * 4 * model.lm.head_dim * model.lm.num_attention_heads * pairs


def count_gemm_flops(step: Callable[[], object]) -> int:
    """GEMM FLOPs of ``step()`` (forward + backward) as PyTorch's FLOP counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    totals = counter.get_flop_counts().get("Global", {})
    return int(sum(n for op, n in totals.items() if _op_name(op) in GEMM_OPS))


def step_flops(model: ModelConfig, batches: Sequence[VLMBatch], image_seq_length: int,
               step: Callable[[], object]) -> Dict[str, int]:
    """GEMMs of ``step`` (one training step over ``batches``) + attention of ``batches``."""
    gemm = count_gemm_flops(step)
    pairs = {"self_attention": 0, "fusion": 0}
    for batch in batches:
        for key, n in attention_pairs(model, batch.to("cpu"), image_seq_length).items():
            pairs[key] += n
    attention = attention_flops(model, pairs["self_attention"] + pairs["fusion"])
    return {"gemm": gemm, "attention": attention, "total": gemm + attention,
            "attention_pairs": pairs["self_attention"] + pairs["fusion"], **{f"pairs_{k}": v for k, v in pairs.items()}}


def _op_name(op) -> str:
    return str(op).split(".")[1] if str(op).startswith("aten.") else str(op)  # "aten.mm" -> "mm"

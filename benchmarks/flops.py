"""FLOPs of what a training step actually runs, for MFU (``benchmarks/gpu_check.py`` part f).

The count itself lives in the package (``casa_megatron/training/flops.py``: GEMMs from the
config and the micro-batch's metadata, attention from the visible query-key pairs), because the
training loop logs it every step. This module adds the oracle it is proven against:
``torch.utils.flop_counter.FlopCounterMode`` around one real training step (forward and
backward of every micro-batch) of the local-spec model, keeping only the matrix-multiply ops
(``mm``, ``addmm``, ``bmm``, ``baddbmm``) -- fused attention kernels (flash-attn, Transformer
Engine, SDPA) are not GEMMs there, which is why attention is counted from the pairs.
``step_flops`` reports both GEMM counts: they agree exactly unless the step recomputes
activations (``model.recompute``), which the counter sees and model FLOPs exclude.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from casa_megatron.config.schema import ModelConfig
from casa_megatron.model.batch import VLMBatch
from casa_megatron.training.flops import attention_flops, attention_pairs, microbatch_flops

__all__ = ["GEMM_OPS", "attention_flops", "attention_pairs", "count_gemm_flops", "step_flops"]

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def count_gemm_flops(step: Callable[[], object]) -> int:
    """GEMM FLOPs of ``step()`` (forward + backward) as PyTorch's FLOP counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    totals = counter.get_flop_counts().get("Global", {})
    return int(sum(n for op, n in totals.items() if _op_name(op) in GEMM_OPS))


def step_flops(model: ModelConfig, batches: Sequence[VLMBatch], image_seq_length: int,
               step: Callable[[], object]) -> Dict[str, int]:
    """Model FLOPs of one training step over ``batches`` (the analytic count the loop logs), with
    torch's counter on ``step`` beside it as a cross-check of the GEMM part."""
    counted = count_gemm_flops(step)
    gemm = attention = 0
    pairs = {"self_attention": 0, "fusion": 0}
    for batch in batches:
        batch = batch.to("cpu")
        counts = microbatch_flops(model, batch, image_seq_length)
        gemm, attention = gemm + counts.gemm, attention + counts.attention
        for key, n in attention_pairs(model, batch, image_seq_length).items():
            pairs[key] += n
    return {"gemm": gemm, "gemm_counter": counted, "gemm_counter_matches": counted == gemm,
            "attention": attention, "total": gemm + attention,
            "attention_pairs": pairs["self_attention"] + pairs["fusion"], **{f"pairs_{k}": v for k, v in pairs.items()}}


def _op_name(op) -> str:
    return str(op).split(".")[1] if str(op).startswith("aten.") else str(op)  # "aten.mm" -> "mm"

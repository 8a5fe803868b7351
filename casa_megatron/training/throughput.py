"""Training throughput in model FLOPs: TFLOP/s per device and MFU, for the step log.

``FlopMeter`` wraps the training iterator handed to megatron's schedule, so every micro-batch
that ``forward_step`` pulls (on every pipeline stage, each with the whole micro-batch) is
counted by ``training/flops.py`` as it goes by: the loop and ``forward_step`` stay unchanged, and
evaluation (which also runs ``forward_step``) is not counted. On a logging step the loop sums the
count over the data-parallel group (each DP rank counted only its own micro-batches) and divides
by the world size (TP * PP * DP ranks share the work) and the step time, as Megatron-LM's
"throughput per GPU (TFLOP/s/GPU)".

MFU = that throughput / the device's peak dense TFLOP/s: ``tracking.peak_tflops`` when set, else
the datasheet figure for the GPU's name and the run's precision (FP8 when ``precision.fp8``,
bf16 when ``precision.bf16``); fp32 runs, CPUs and unknown GPUs log no ``mfu``.
"""

from __future__ import annotations

import time
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from casa_megatron.config.pipeline_split import rank_totals
from casa_megatron.config.schema import ModelConfig, TrainConfig
from casa_megatron.training.flops import microbatch_flops

# Peak dense (no 2:4 sparsity) tensor-core TFLOP/s per GPU, from NVIDIA's H100 datasheet
# (H100 SXM: BF16 989.4, FP8 1,978.9; H100 PCIe: BF16 756.5, FP8 1,513) and H200 datasheet
# (H200 SXM: same as H100 SXM). The datasheets print twice these numbers "with sparsity".
# First matching fragment of torch.cuda.get_device_name() wins; NVL parts are left unknown
# (set tracking.peak_tflops).
PEAK_DENSE_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.5, "fp8": 1513.0}),
    ("H100 NVL", {}),
    ("H200 NVL", {}),
    ("H100", {"bf16": 989.4, "fp8": 1978.9}),
    ("H200", {"bf16": 989.4, "fp8": 1978.9}),
)


def datasheet_peak_tflops(device_name: str, precision: Optional[str]) -> Optional[float]:
    """Peak dense TFLOP/s of ``device_name`` in ``precision`` ("bf16" / "fp8"), None if unknown."""
    for fragment, peaks in PEAK_DENSE_TFLOPS:
        if fragment in device_name:
            return peaks.get(precision) if precision else None
    return None


def peak_tflops(cfg: TrainConfig) -> Optional[float]:
    """``tracking.peak_tflops``, else the datasheet peak of this GPU at the run's precision."""
    if cfg.tracking.peak_tflops is not None:
        return cfg.tracking.peak_tflops
    if not torch.cuda.is_available():
        return None
    precision = "fp8" if cfg.precision.fp8 else "bf16" if cfg.precision.bf16 else None
    return datasheet_peak_tflops(torch.cuda.get_device_name(), precision)


class FlopMeter:
    """An iterator over ``source`` that adds up the model FLOPs of the micro-batches it yields,
    and the time spent waiting for them (``data_wait_s``: a step whose wait approaches its step
    time is bound by data loading, not compute; Megatron-LM's "batch-generator" timer)."""

    def __init__(self, model: ModelConfig, image_seq_length: int, stage_layers: Optional[List[int]] = None,
                 stage_vision_blocks: Optional[List[int]] = None, ranks: Optional[int] = None):
        """``stage_layers``: LM layers per pipeline stage (PP > 1): the FLOPs of each stage are
        kept too (``last_stage_flops``), for the logged ``pipeline_balance``;
        ``stage_vision_blocks``: encoder blocks per stage (None: all on the first). ``ranks``
        (the interleaved schedule): ``stage_layers`` are per virtual stage, and each rank's
        FLOPs are those of its chunks (virtual stages ``r, r + ranks, ...``)."""
        self.model, self.image_seq_length = model, image_seq_length
        self.stage_layers, self.stage_vision_blocks, self.ranks = stage_layers, stage_vision_blocks, ranks
        self.flops = 0  # since the last take()
        self.stage_flops = [0] * (ranks or len(stage_layers or []))
        self.last_stage_flops: List[int] = []
        self.data_wait_s = 0.0  # time spent in the source's next(), since the last take()
        self.last_data_wait_s = 0.0  # ... up to the last take(): the step just run
        self._source: Optional[Iterator] = None

    def over(self, source: Iterator) -> "FlopMeter":
        self._source = source
        return self

    def __iter__(self) -> "FlopMeter":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            batch = next(self._source)
        finally:
            self.data_wait_s += time.perf_counter() - start
        counts = microbatch_flops(self.model, batch, self.image_seq_length)
        self.flops += counts.total
        if self.stage_layers:
            stages = counts.stage_totals(self.stage_layers, self.stage_vision_blocks)
            if self.ranks:
                stages = rank_totals(stages, self.ranks)
            self.stage_flops = [a + b for a, b in zip(self.stage_flops, stages)]
        return batch

    def take(self) -> int:
        """FLOPs counted since the last call (one step's micro-batches), and start afresh
        (that step's data wait moves to ``last_data_wait_s``)."""
        flops, self.flops = self.flops, 0
        self.last_data_wait_s, self.data_wait_s = self.data_wait_s, 0.0
        self.last_stage_flops, self.stage_flops = self.stage_flops, [0] * len(self.stage_flops)
        return flops

    def pipeline_metrics(self) -> Dict[str, float]:
        """PP > 1: ``pipeline_balance`` = mean / max stage FLOPs of the last step (1.0 = even;
        the heaviest stage sets the pace of 1F1B) and the heaviest stage's share of them."""
        stages = self.last_stage_flops
        if len(stages) < 2 or not max(stages):
            return {}
        return {"pipeline_balance": sum(stages) / len(stages) / max(stages),
                "pipeline_heaviest_stage_share": max(stages) / sum(stages)}

    def pipeline_warning(self, threshold: float = 0.8) -> Optional[str]:
        """A one-line warning when the last step's stages are this unbalanced in model FLOPs
        (``pipeline_balance`` below ``threshold``): the heaviest stage sets 1F1B's pace."""
        balance = self.pipeline_metrics().get("pipeline_balance")
        if balance is None or balance >= threshold:
            return None
        stages = self.last_stage_flops
        shares = " / ".join(f"{100 * f / sum(stages):.0f} %" for f in stages)
        heaviest = stages.index(max(stages))
        if self.ranks:
            per_rank = " + ".join(map(str, rank_totals(self.stage_layers, self.ranks)))
            return (f"pipeline ranks unbalanced: model FLOPs per rank {shares} of the step ({len(self.stage_layers) // self.ranks} "
                    f"model chunks per rank, LM layers per rank {per_rank}, the vision encoder on rank 0); rank "
                    f"{heaviest} sets the pace, balance {balance:.2f}. benchmarks/pipeline_balance.py suggests an uneven "
                    "split (parallel.num_layers_in_first_pipeline_stage / ..._last_..., each a multiple of the chunks "
                    "per rank), or, without parallel.virtual_pipeline_model_parallel_size, the encoder over several stages")
        encoder = (f", encoder blocks {' + '.join(map(str, self.stage_vision_blocks))}"
                   if self.stage_vision_blocks and any(self.stage_vision_blocks[1:]) else "")
        return (f"pipeline stages unbalanced: model FLOPs per stage {shares} of the step (LM layers "
                f"{' + '.join(map(str, self.stage_layers))}{encoder}); stage {heaviest} sets the pace, balance "
                f"{balance:.2f}. benchmarks/pipeline_balance.py suggests "
                "parallel.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage, or the "
                "encoder over several stages (parallel.vision_blocks_per_pipeline_stage)")


def throughput_metrics(flops: int, losses: List[Dict], step_time: float, peak: Optional[float]) -> Dict[str, float]:
    """(last stage, logging step) ``tflops_per_device``, ``answer_tokens_per_s`` and, with a
    known peak, ``mfu``, over the whole global batch: one all-reduce over the DP group."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokens = sum(float(l["tokens"]) for l in losses)  # answer tokens (loss_mask) of this rank's micro-batches
    sums = torch.tensor([float(flops), tokens], dtype=torch.float64, device=device)
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    tflops = float(sums[0]) / dist.get_world_size() / step_time / 1e12
    metrics = {"tflops_per_device": tflops, "answer_tokens_per_s": float(sums[1]) / step_time}
    if peak:
        metrics["mfu"] = tflops / peak
    return metrics

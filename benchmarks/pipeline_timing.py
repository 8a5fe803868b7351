"""Timing for ``benchmarks/pipeline_balance.py`` on this machine: ``calibrate`` (seconds per FLOP
of the encoder side and of the LM side, one process) and ``measure`` (a plan's PP=2 rows run on two
forked CPU ranks). Kept apart from the planner, which needs neither a model nor a process group."""

from __future__ import annotations

from typing import List, Optional, Tuple

from benchmarks.common import BenchConfig, fusion_model_config, image_heavy_batch
from benchmarks.pipeline_balance import Rates, Split
from casa_megatron.training.flops import microbatch_flops


# --- calibrating the costs on this machine (one process, CPU or one GPU) ----------------------------
def _time_model(cfg: BenchConfig, fusion: str, steps: int) -> float:
    """Median seconds of forward + backward over the step's micro-batches, TP = PP = 1."""
    import statistics
    import time

    import torch

    from benchmarks.common import build_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = cfg.data
    model = build_model(cfg, fusion, data.image_seq_length)
    device = next(model.parameters()).device
    batches = [image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed + k).to(device)
               for k in range(data.num_microbatches)]
    times = []
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            (model(batch) * batch.loss_mask).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(cfg: BenchConfig, fusion: str, steps: int) -> Tuple[Rates, dict]:
    """Seconds per FLOP of the encoder side and of the LM side on this machine, from two timed
    runs of the whole model (each in a fresh process): with the encoder, and with the frozen stub in
    its place (``vision: frozen_stub``: the same LM work, the projector still trains). LM rate = the
    stub run's time over its FLOPs; encoder rate = the time the encoder adds over the FLOPs it adds.
    FLOPs alone would favour one side wherever their kernels run at different speeds (on a CPU the
    small encoder GEMMs ran at half the LM's rate)."""
    import dataclasses

    from benchmarks.common import counted_model_config, run_in_child

    with_encoder = dataclasses.replace(cfg, vision="encoder")
    stub = dataclasses.replace(cfg, vision="frozen_stub")
    timed = {name: run_in_child(_time_model, c, fusion, steps, what=f"timing {fusion} ({name})")
             for name, c in (("encoder", with_encoder), ("stub", stub))}

    def flops(c):
        model = counted_model_config(c, fusion)
        data = c.data
        mbs = [microbatch_flops(model, image_heavy_batch(data, model.lm.vocab_size, c.seed + k), data.image_seq_length)
               for k in range(data.num_microbatches)]
        return sum(mb.total for mb in mbs), sum(sum(mb.vision) for mb in mbs)

    (total, vision), (stub_total, stub_vision) = flops(with_encoder), flops(stub)
    lm_rate = timed["stub"] / stub_total
    added = timed["encoder"] - timed["stub"]
    vision_rate = added / (vision - stub_vision) if added > 0 else lm_rate
    detail = {"step_s_with_encoder": timed["encoder"], "step_s_with_stub": timed["stub"], "flops": total,
              "vision_flops": vision, "stub_flops": stub_total, "lm_flops_per_s": 1 / lm_rate,
              "vision_flops_per_s": 1 / vision_rate}
    if added <= 0:
        detail["note"] = "the encoder added no measurable time: its FLOPs are costed at the LM's rate"
    return Rates(vision=vision_rate, lm=lm_rate, unit="s"), detail


# --- measuring the plan on this machine (CPU, PP=2) ---------------------------------------------
def _time_split(rank: int, world: int, cfg: BenchConfig, fusion: str, split: Split, steps: int,
                vp: Optional[int] = None) -> dict:
    """One rank of a PP=2 run with ``split``: the median seconds per training step (forward and
    backward of the step's micro-batches through megatron's 1F1B schedule, no optimizer step) over
    ``steps`` steps after a warm-up one. Barriers frame each step: it is the pipeline's time.
    ``vp``: ``vp`` model chunks per rank through the interleaved schedule instead (``split``'s
    stages cut into equal chunks)."""
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from benchmarks.common import DTYPES
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_model_chunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.step import data_for_chunks, forward_step

    torch.set_num_threads(max(1, cfg.threads))
    initialize_parallel(1, 2, seed=cfg.seed, virtual_pipeline_model_parallel_size=vp)
    parallel = ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=split[0],
                              num_layers_in_last_pipeline_stage=split[1],
                              vision_blocks_per_pipeline_stage=list(split[2]) if split[2] else None,
                              virtual_pipeline_model_parallel_size=vp)
    data = cfg.data
    model = build_model_chunks(fusion_model_config(cfg.model, fusion), parallel, data.image_seq_length,
                               params_dtype=DTYPES[cfg.dtype])
    batches = [image_heavy_batch(data, cfg.model.lm.vocab_size, cfg.seed + k) for k in range(data.num_microbatches)]
    waits = _time_p2p()
    times, busy = [], []
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        waits[0] = 0.0
        start = time.perf_counter()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data_for_chunks(iter(batches), len(model)),
                                    model=model.chunks,
                                    num_microbatches=len(batches), seq_length=data.seq_length + data.image_seq_length,
                                    micro_batch_size=data.micro_batch_size)
        elapsed = time.perf_counter() - start
        dist.barrier()
        if step:  # the first step warms up
            times.append(elapsed)
            busy.append(elapsed - waits[0])
    return {"step_time_s": statistics.median(times), "busy_s": statistics.median(busy),
            "layers": sum(len(chunk.decoder.layers) for chunk in model)}


def _time_p2p() -> List[float]:
    """Accumulate the seconds this rank spends in megatron's pipeline send / receive calls (waiting
    for the other stage, mostly) into the returned one-element list: step time minus that = the
    stage's own compute."""
    import functools
    import time

    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    waits = [0.0]
    original = P2PCommunicator._communicate

    @functools.wraps(original)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            waits[0] += time.perf_counter() - start

    P2PCommunicator._communicate = timed
    return waits


def measure(cfg: BenchConfig, fusion: str, rows: List[dict], steps: int, repeats: int = 1) -> None:
    """Time the even and the best PP=2 split of ``fusion`` (and the interleaved rows) on this machine (two forked CPU ranks),
    alternating them ``repeats`` times (background load then weighs on both alike) and keeping each
    split's median run; adds ``measured_step_s`` / ``measured_busy_s`` (per stage: step time minus
    p2p time) to each row and ``measured_speedup`` to the best one."""
    from support.dist import run_distributed  # tests/support: the forked gloo ranks the tests use

    runs = {id(row): [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            split = (row["first"], row["last"], tuple(row["vision_blocks"]) if row["vision_blocks"] else None)
            result = run_distributed(_time_split, world_size=2, cfg=cfg, fusion=fusion, split=split, steps=steps,
                                     vp=row.get("vp"))
            assert [r["layers"] for r in result] == row["layers"], (result, row["layers"])
            runs[id(row)].append(result)
    for row in rows:
        ordered = sorted(runs[id(row)], key=lambda result: result[0]["step_time_s"])
        median = ordered[len(ordered) // 2]
        row["measured_step_s"] = median[0]["step_time_s"]
        row["measured_step_s_runs"] = [result[0]["step_time_s"] for result in runs[id(row)]]
        if row.get("vp"):  # its exchange is overlapped: waits happen outside the timed calls
            row["measured_busy_s"], row["measured_busy"] = None, "n/a"
        else:
            row["measured_busy_s"] = [r["busy_s"] for r in median]
            row["measured_busy"] = " / ".join(f"{r['busy_s']:.3g}" for r in median)
    if rows[0]["split"].startswith("even"):
        for row in rows[1:]:
            row["measured_speedup"] = rows[0]["measured_step_s"] / row["measured_step_s"]

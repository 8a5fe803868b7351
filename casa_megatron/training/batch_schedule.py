"""How many micro-batches each step runs: a constant global batch, or Megatron-LM's batch-size
ramp-up (``rampup_batch_size: [start, increment, ramp_samples]``, its ``--rampup-batch-size``).

The numbers come from megatron-core's own calculators (``num_microbatches_calculator``), used as
instances rather than through megatron's process-wide global: the global batch starts at
``start`` and grows by ``increment`` every ``ramp_samples / ((global_batch_size - start) /
increment)`` consumed samples until it reaches ``global_batch_size``. The count of consumed
samples is not stored: a resumed run replays the schedule over the steps already done, so it
continues at the batch size the uninterrupted run would have used (the data position itself is
restored from the checkpoint as always). The learning-rate schedule keeps counting steps.
"""

from __future__ import annotations

from typing import Tuple

from megatron.core.num_microbatches_calculator import (
    ConstantNumMicroBatchesCalculator,
    RampupBatchsizeNumMicroBatchesCalculator,
)

from casa_megatron.config.errors import ConfigError
from casa_megatron.config.schema import TrainConfig


class BatchSchedule:
    """Global batch size and micro-batches per data-parallel rank, by consumed samples."""

    def __init__(self, cfg: TrainConfig, dp_size: int, rank: int = 0):
        mbs, gbs, per_step = cfg.micro_batch_size, cfg.global_batch_size, cfg.micro_batch_size * dp_size
        sizes = [("global_batch_size", gbs)]
        if cfg.rampup_batch_size is not None:
            start, increment, _ = cfg.rampup_batch_size
            sizes += [("rampup_batch_size start", start), ("rampup_batch_size increment", increment)]
        for name, value in sizes:
            if value % per_step:
                raise ConfigError(f"{name}={value} is not a multiple of micro_batch_size x data-parallel size = "
                                  f"{mbs} x {dp_size} = {per_step}: every rank must run whole micro-batches")
        _check_interleaved(cfg, per_step)
        if cfg.rampup_batch_size is None:
            self._calc = ConstantNumMicroBatchesCalculator(gbs, mbs, dp_size, False, rank)
        else:
            start, increment, samples = cfg.rampup_batch_size
            self._calc = RampupBatchsizeNumMicroBatchesCalculator(gbs, mbs, dp_size, False, rank, start, increment,
                                                                  samples)
        self.full_num_micro = gbs // per_step  # at the full global batch (validation uses it)

    def at(self, consumed_samples: int) -> Tuple[int, int]:
        """(global batch size, micro-batches per data-parallel rank) of the next step."""
        self._calc.update(consumed_samples, consistency_check=True)
        return self._calc.get_current_global_batch_size(), self._calc.get()

    def consumed_after(self, steps: int) -> int:
        """Samples consumed by the first ``steps`` steps (the replay of a resumed run)."""
        consumed = 0
        for _ in range(steps):
            consumed += self.at(consumed)[0]
        return consumed


def _check_interleaved(cfg: TrainConfig, per_step: int) -> None:
    """The interleaved schedule (``parallel.virtual_pipeline_model_parallel_size``) runs the
    micro-batches of a step in groups of ``pipeline_model_parallel_size`` per model chunk; megatron
    refuses a step whose count is not a multiple of it (a partial group would stall the
    pipeline). Checked for every global batch size the run will use, before the model is built."""
    pp, vp = cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size
    if not vp:
        return
    sizes = [cfg.global_batch_size]
    if cfg.rampup_batch_size is not None:
        start, increment, _ = cfg.rampup_batch_size
        sizes = list(range(start, cfg.global_batch_size, increment)) + sizes
    for size in sizes:
        micro = size // per_step
        if micro % pp:
            raise ConfigError(
                f"a global batch of {size} is {micro} micro-batches per data-parallel rank (micro_batch_size="
                f"{cfg.micro_batch_size} x {per_step // cfg.micro_batch_size} data-parallel ranks), not a multiple of "
                f"parallel.pipeline_model_parallel_size={pp}, which the interleaved schedule "
                f"(parallel.virtual_pipeline_model_parallel_size={vp}) needs"
                + (" (rampup_batch_size included)" if cfg.rampup_batch_size is not None else ""))

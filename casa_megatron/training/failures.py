"""Failures in the middle of a run that leave its checkpoints intact (``casa-train`` exit status 4).

They differ from a crash in what a person (or a requeue script) should do next: nothing is wrong
with the code or the setup, the run itself stopped, and the message names the step or the
checkpoint and the newest checkpoint to go on from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# megatron-core's DDP checks every bucket's local gradient norm before the data-parallel
# reduction (``check_for_nan_in_grad``) and raises a RuntimeError carrying one of these.
NON_FINITE_GRADIENTS = ("found NaN in local grad norm", "found Inf in local grad norm")


class RunFailed(RuntimeError):
    """The run stopped mid-way; the checkpoints written so far are intact."""


class TrainingDiverged(RunFailed):
    """A step's gradients are NaN or Inf. The optimizer never applied them (megatron checks before
    the reduction), and no checkpoint is written after the failure."""

    def __init__(self, step: int, cause: BaseException, newest: Optional[Path]):
        what = next((m for m in NON_FINITE_GRADIENTS if m in str(cause)), "non-finite gradients")
        resume = (f"the newest checkpoint is {newest.name}: resume from it with a lower learning rate, a longer "
                  f"warmup or optimizer.clip_grad, or look at the data of this step" if newest is not None
                  else "no checkpoint was written yet")
        super().__init__(f"training diverged at step {step}: the gradients are not finite ({what}; megatron: "
                         f"{str(cause).splitlines()[0][:300]}). Nothing of this step was applied or saved; {resume}")
        self.step = step


def non_finite_gradients(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in NON_FINITE_GRADIENTS)

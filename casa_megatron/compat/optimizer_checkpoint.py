"""Save the distributed optimizer's state right when its gradient buffer has several buckets.

The bug (megatron-core 0.16.1, fixed upstream by NVIDIA/Megatron-LM#5077 after the release we
pin): for the ``fully_reshardable`` checkpoint format, ``DistributedOptimizer`` first gathers its
state into one "world" tensor per buffer with the padding at the end of every bucket *removed*,
then cuts each parameter's state out of it at the parameter's offset in the *padded* buffer.
With one bucket the two offsets agree. With several -- every run with
``parallel.overlap_grad_reduce`` (megatron cuts buckets of ~40M parameters then), and the word
embeddings' own bucket under pipeline parallelism with tied embeddings -- every parameter after
the first bucket is saved shifted by the padding before it, its tail zero-filled (the only sign
is a log line "param range exceeds unpadded buffer ... data corruption"). Loading puts each
saved tensor back where the parameter is, so Adam moments and fp32 master weights come back
wrong. Measured before this fix: a DP=2 run with 24 buckets resumed at step 5 with a loss of
2.74 instead of 2.17.

The fix, kept outside megatron's code: the gathered world tensors are laid out again in the
padded buffer's coordinates (each bucket's data at the bucket's own offset, zeros in the
padding), which is what the slicing expects. Loading needs nothing: it reads each parameter's
saved tensor on its own. Applied per optimizer instance, only to the releases with the bug.
"""

from __future__ import annotations

from typing import Dict, Iterable

# The release we pin, where the bug was reproduced (tests/training/test_overlap.py). Another
# release is left alone: a fixed one would shift the state back the other way; that test tells.
AFFECTED_RELEASES = ("0.16.1",)
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def _affected() -> bool:
    import megatron.core

    return str(getattr(megatron.core, "__version__", "")) in AFFECTED_RELEASES


def _distributed_optimizers(optimizer) -> Iterable:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            yield opt


def to_padded_layout(world: Dict, buffer) -> Dict:
    """One buffer's gathered state ({key: [numel_unpadded]}, buckets back to back) -> the same
    tensors in the buffer's padded coordinates ([numel]; bucket k at ``buffer.buckets[k].offset``)."""
    out = dict(world)
    for key in STATE_KEYS:
        if key not in world:
            continue
        packed = world[key]  # [sum of the buckets' unpadded sizes]
        padded = packed.new_zeros(buffer.numel)  # [numel]
        start = 0
        for bucket in buffer.buckets:
            n = bucket.numel_unpadded
            padded[bucket.offset:bucket.offset + n] = packed[start:start + n]
            start += n
        if start != packed.numel():
            raise RuntimeError(f"distributed optimizer state of {packed.numel()} elements does not match its "
                               f"buffer's buckets ({start} unpadded elements)")
        out[key] = padded
    return out


def fix_fully_reshardable_save(optimizer) -> int:
    """Apply the fix to every distributed optimizer in ``optimizer`` (a megatron optimizer or a
    chain); returns how many were patched (0 on a megatron-core without the bug)."""
    if not _affected():
        return 0
    patched = 0
    for opt in _distributed_optimizers(optimizer):
        gather = opt.get_parameter_state_dp_zero  # bound method of this instance

        def gather_in_padded_layout(*args, _gather=gather, _opt=opt, **kwargs):
            state = _gather(*args, **kwargs)
            if state is None:  # ranks that receive nothing in the memory-efficient mode
                return None
            for gbuf_idx, by_dtype in state.items():
                if not isinstance(gbuf_idx, int):
                    continue  # "buckets_coalesced"
                buffer = _opt.buffers[gbuf_idx]
                state[gbuf_idx] = {dtype: to_padded_layout(world, buffer) for dtype, world in by_dtype.items()}
            return state

        opt.get_parameter_state_dp_zero = gather_in_padded_layout
        patched += 1
    return patched


__all__ = ["AFFECTED_RELEASES", "fix_fully_reshardable_save", "to_padded_layout"]

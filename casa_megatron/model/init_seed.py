"""Each component of the model draws its initial weights from a seed of its own.

Why: megatron draws every weight from one running random stream, so a weight's initial value
depends on everything built before it on the same rank. Pipeline stage 1 builds its first layer
with a fresh stream, stage 0 after the embedding and the vision encoder, so a model trained at
PP=2 started from other weights than at PP=1 -- and again other ones for each uneven split
(``parallel.num_layers_in_first_pipeline_stage``). Likewise a CASA model drew its LM layers after
the extra CASA weights of earlier layers, so insertion and CASA runs "from the same seed" did not
start from the same language model.

Here every component (the embedding, the vision encoder, the projector, LM layer ``i`` by its
*global* index, the output layer, and inside a CASA layer its CASA weights) is built inside
:func:`component_seed`, which seeds the random generators from the run's seed and the component's
name, then restores them. With megatron's CPU initialisation (``use_cpu_initialization``: each
rank draws the full weight, then keeps its shard) every TP / PP layout and split therefore starts
from the same full weights, and every fusion from the same language model: a CASA layer's
self-attention and MLP equal the plain layer's (``tests/model/test_init_seed.py``). On a GPU megatron
draws each tensor-parallel shard from its model-parallel RNG tracker; that tracker is re-seeded
per component too, so the draw is independent of the stage layout there as well (for one TP size).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch


def derived_seed(base: int, component: str) -> int:
    """A seed for ``component`` that depends only on the run's seed and the component's name."""
    return (int(base) * 1_000_003 + zlib.crc32(component.encode())) % (2**31 - 1)


@contextmanager
def component_seed(base: int, component: str):
    """Build ``component`` under its own seed; the random state outside is left as it was."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    seed = derived_seed(base, component)
    tracker = get_cuda_rng_tracker()
    saved = tracker.get_states() if tracker.is_initialized() else None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)  # the tracker megatron's GPU initialisation forks
        try:
            yield seed
        finally:
            if saved is None:
                tracker.reset()
            else:
                tracker.set_states(saved)

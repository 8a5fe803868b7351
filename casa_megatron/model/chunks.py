"""The model chunks one pipeline rank holds, as one module.

Without the interleaved schedule a rank holds one chunk: its pipeline stage. With
``parallel.virtual_pipeline_model_parallel_size = vp`` it holds ``vp`` of them (chunk ``v`` of
rank ``r`` is virtual stage ``v * pp + r``), and megatron's interleaved schedule, DDP and
optimizer take them as a list. Checkpoints, weight loads, LoRA helpers and tools want one
module; this ``ModuleList`` is both: its state-dict keys are ``<chunk>.<key>``, and its
``sharded_state_dict`` keeps every tensor's *checkpoint* key as the chunk made it (global layer
indices), so a checkpoint written with chunks loads without them and the other way round.
"""

from __future__ import annotations

from typing import List

import torch


class ModelChunks(torch.nn.ModuleList):
    @property
    def chunks(self) -> List[torch.nn.Module]:
        """The chunks as the plain list megatron's schedules, DDP and optimizer expect."""
        return list(self)

    @property
    def config(self):
        """The LM's TransformerConfig (each chunk holds its own, with the same values)."""
        return self[0].config

    @property
    def model_config(self):
        """Our ModelConfig (the same in every chunk)."""
        return self[0].model_config

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Every chunk's sharded state dict under ``<chunk>.``: the dict keys match
        ``state_dict()``, the checkpoint keys inside stay the chunks' own (layout-free)."""
        sharded = {}
        for i, chunk in enumerate(self):
            for key, value in chunk.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                                       metadata=metadata).items():
                sharded[f"{i}.{key}"] = value
        return sharded

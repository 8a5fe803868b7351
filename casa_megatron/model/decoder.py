"""The LM decoder stack of one pipeline stage: megatron layers and CASA layers side by side.

megatron's TransformerBlock passes one fixed set of arguments to every layer; CASA layers also
need the image states and windows, so this small block calls each layer with what it needs
instead of smuggling images through unrelated arguments.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core import parallel_state
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from casa_megatron.config.schema import RecomputeConfig
from casa_megatron.model.casa_layer import CASATransformerLayer
from casa_megatron.model.init_seed import component_seed
from casa_megatron.model.recompute import NO_RECOMPUTE, run_layers
from casa_megatron.model.vision_context import VisionContext


class CASADecoder(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_specs: List[ModuleSpec], final_norm,
                 post_process: bool, pg_collection: Optional[ProcessGroupCollection] = None,
                 recompute: RecomputeConfig = NO_RECOMPUTE, seed: Optional[int] = None,
                 vp_stage: Optional[int] = None):
        """``seed``: the run's seed; layer ``i`` is initialised from its own seed derived from it and
        its global index (model/init_seed.py), so it starts the same whichever stage builds it.
        ``vp_stage``: which of this rank's model chunks this is (interleaved schedule), else None."""
        super().__init__(config=config)
        self.recompute = recompute
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        # megatron's own split rule, even or uneven (config/pipeline_split.py states it as data)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        num_local = get_num_layers_to_build(config, vp_stage, pp_rank)
        self.layer_offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        seed = torch.initial_seed() if seed is None else seed
        layers = []
        for i in range(num_local):
            with component_seed(seed, f"lm.layers.{self.layer_offset + i}"):
                layers.append(build_module(layer_specs[self.layer_offset + i], config=config, layer_number=i + 1,
                                           pg_collection=pg_collection, vp_stage=vp_stage))
        self.layers = torch.nn.ModuleList(layers)
        self.final_layernorm = None
        if post_process:
            self.final_layernorm = build_module(final_norm, config=config,
                                                hidden_size=config.hidden_size,
                                                eps=config.layernorm_epsilon)

    def forward(self, hidden_states: Tensor, image_states: Tensor, vision: VisionContext,
                attention_mask: Optional[Tensor],
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        """Self-attention sees packed samples either through ``packed_seq_params`` (cu_seqlens,
        ``model/packed_attention.py``) or through a dense ``attention_mask`` (the reference)."""
        # hidden_states [s(/tp), b, h]; image_states [si(/tp), b, h]
        # FP8 autocast (Transformer Engine) when config.fp8 is set; a null context otherwise.
        def call(layer, hidden: Tensor) -> Tensor:
            if isinstance(layer, CASATransformerLayer):
                return layer(hidden, image_states, vision, attention_mask, packed_seq_params)
            return layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=vision.text_rotary,
                         packed_seq_params=packed_seq_params)[0]

        with get_fp8_context(self.config):
            hidden_states = self.run_layers(hidden_states, call)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def run_layers(self, hidden_states: Tensor, call) -> Tensor:
        """``call(layer, hidden)`` through this stage's layers, recomputing as ``model.recompute``
        says (``model/recompute.py``); insertion's decoder loop uses it too."""
        return run_layers(self.layers, hidden_states, call, self.recompute, self.config)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Layers are keyed by their *global* index so checkpoints reshard across PP layouts."""
        sharded = {}
        for local_idx, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local_idx}."
            global_prefix = f"{prefix}layers.{self.layer_offset + local_idx}."
            layer_sd = layer.sharded_state_dict(prefix=local_prefix, sharded_offsets=sharded_offsets,
                                                metadata=metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, global_prefix)
            sharded.update(layer_sd)
        if self.final_layernorm is not None:
            from megatron.core.transformer.utils import sharded_state_dict_default

            sharded.update(sharded_state_dict_default(
                self.final_layernorm, f"{prefix}final_layernorm.", sharded_offsets, metadata,
                parallel_state.get_tensor_model_parallel_group()))
        return sharded

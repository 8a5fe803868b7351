"""A decoder layer that holds a CASA module next to (or instead of) its self-attention.

Placements (DESIGN.md §1), each a small private block method in the moshi style:

* ``parallel`` (default): ``h = x + SA(N1 x) + CASA(N2 x)``; ``out = h + MLP(N3 h)``
* ``before``:   ``x = x + CASA(Nc x)``; then ``h = x + SA(N1 x)``; ``out = h + MLP(N3 h)``
* ``replace``:  ``h = x + CASA(N1 x)``; ``out = h + MLP(N3 h)`` (no self-attention)

Image tokens pass through the same pre-attention norm as the text (``N2``, ``Nc`` or ``N1``)
before the CASA projections, as they would in token insertion where they are ordinary tokens of
the stream: the projector's output is not on the normalised text's scale (about 0.01 vs 1 at
initialisation), and un-normalised image keys/values that are ~100x smaller than the text's left
the model ignoring the images (docs/benchmarks.md). ``normalize_images=False`` keeps the raw
projector output (an ablation).

With ``share_projections`` the CASA module reuses this layer's SA Q/K/V/O (no new weights).
New CASA weights are copied from the same layer's SA by :meth:`init_casa_from_self_attention`.

With ``gate`` (``model.fusion.cross_attention_gate``) the fusion output is multiplied by
``tanh(alpha)``, a scalar initialised at 0 (Flamingo / mllama): at initialisation the layer is
exactly the backbone layer, and alpha still gets a gradient (d tanh/d alpha = 1 at 0). CASA itself
needs no gate (its softmax over [image, text] keys balances them); vanilla cross-attention does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from torch import Tensor

from casa_megatron.model.init_seed import component_seed
from casa_megatron.model.vision_context import VisionContext

PLACEMENTS = ("parallel", "before", "replace")


@dataclass
class CASALayerSubmodules:
    input_layernorm: Union[ModuleSpec, type] = IdentityOp
    self_attention: Union[ModuleSpec, type, None] = None
    self_attn_bda: Union[ModuleSpec, type] = IdentityFuncOp
    casa_layernorm: Union[ModuleSpec, type] = IdentityOp
    casa_attention: Union[ModuleSpec, type, None] = None
    casa_bda: Union[ModuleSpec, type] = IdentityFuncOp
    pre_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp
    mlp: Union[ModuleSpec, type] = IdentityOp
    mlp_bda: Union[ModuleSpec, type] = IdentityFuncOp
    sharded_state_dict_keys_map: Dict[str, str] = field(default_factory=dict)


class CASATransformerLayer(MegatronModule):
    """[s, b, h] -> [s, b, h], reading the images through a :class:`VisionContext`."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: CASALayerSubmodules,
        layer_number: int = 1,
        placement: str = "parallel",
        share_projections: bool = False,
        gate: bool = False,
        normalize_images: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        if placement not in PLACEMENTS:
            raise ValueError(f"CASA placement {placement!r} not in {PLACEMENTS}")
        if share_projections and placement == "replace":
            raise ValueError("share_projections needs a self-attention: not with placement='replace'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.submodules_config = submodules
        self.tp_group = pg_collection.tp
        self.placement = placement
        self.share_projections = share_projections
        self.normalize_images = normalize_images
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, parallel_state.get_pipeline_model_parallel_rank()
        )
        self.hidden_dropout = config.hidden_dropout

        def norm(spec):
            return build_module(spec, config=config, hidden_size=config.hidden_size,
                                eps=config.layernorm_epsilon)

        self.input_layernorm = norm(submodules.input_layernorm)
        if placement != "replace":
            self.self_attention = build_module(
                submodules.self_attention, config=config, layer_number=self.layer_number,
                pg_collection=pg_collection,
            )
            self.self_attn_bda = build_module(submodules.self_attn_bda)
            self.casa_layernorm = norm(submodules.casa_layernorm)
        shared = None
        if share_projections:
            sa = self.self_attention
            shared = (sa.linear_qkv, sa.linear_proj, sa.q_layernorm or IdentityOp(), sa.k_layernorm or IdentityOp())
        # the CASA weights draw from a seed of their own: the layer's self-attention and MLP then
        # start as the same layer of a model without CASA (model/init_seed.py)
        with component_seed(torch.initial_seed(), "casa_attention"):
            self.casa_attention = build_module(
                submodules.casa_attention, config=config, layer_number=self.layer_number,
                shared_projections=shared, pg_collection=pg_collection,
            )
        self.casa_bda = build_module(submodules.casa_bda)
        self.pre_mlp_layernorm = norm(submodules.pre_mlp_layernorm)
        self.mlp = build_module(submodules.mlp, config=config, tp_group=pg_collection.tp)
        self.mlp_bda = build_module(submodules.mlp_bda)
        self.register_parameter("casa_gate", None)  # tanh gate alpha, see add_gate
        if gate:
            self.add_gate()
        if config.perform_initialization:
            self.init_casa_from_self_attention()

    def add_gate(self) -> None:
        """Create the tanh gate ``alpha`` (shape [1], zero) if the layer has none yet.

        Replicated over TP ranks. Under sequence parallelism each rank sees a slice of the
        sequence, so alpha's gradient is partial and carries the ``sequence_parallel`` tag that
        gradient finalisation sums over TP (like the norm weights).
        """
        if self.casa_gate is not None:
            return
        if self.placement == "replace":
            raise ValueError("a gated 'replace' layer would start with no attention at all: use the gate "
                             "with placement 'parallel' or 'before'")
        device = next(self.parameters()).device
        self.casa_gate = torch.nn.Parameter(torch.zeros(1, dtype=self.config.params_dtype, device=device))
        setattr(self.casa_gate, "sequence_parallel", self.config.sequence_parallel)

    # --- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_casa_from_self_attention(self) -> None:
        """Copy this layer's SA projections (its pre-SA norm, and its per-head q/k norms when the
        backbone has them) into the CASA module.

        Call again after loading backbone weights (e.g. from Hugging Face). No-op when CASA
        replaces SA (it then *is* the backbone attention); with shared projections only the
        CASA norm is new, and it is copied.
        """
        if self.placement == "replace":
            return
        _copy_norm(self.input_layernorm, self.casa_layernorm)
        if self.share_projections:
            return
        sa, casa = self.self_attention, self.casa_attention
        for src, dst in ((sa.q_layernorm, casa.q_layernorm), (sa.k_layernorm, casa.k_layernorm)):
            if src is not None:
                _copy_norm(src, dst)
        for src, dst in ((sa.linear_qkv, casa.linear_qkv), (sa.linear_proj, casa.linear_proj)):
            dst_state = dst.state_dict()
            for name, value in src.state_dict().items():
                if name in dst_state and torch.is_tensor(value) and value.shape == dst_state[name].shape:
                    dst_state[name].copy_(value)

    def casa_parameters(self):
        """Parameters created for CASA (new weights; empty when projections are shared)."""
        gate = [self.casa_gate] if self.casa_gate is not None else []
        if self.placement == "replace":
            return list(self.casa_attention.parameters()) + gate
        return list(self.casa_attention.parameters()) + list(self.casa_layernorm.parameters()) + gate

    # --- blocks -----------------------------------------------------------------------------
    def _bda(self, bda, out_with_bias, residual: Tensor) -> Tensor:
        return bda(self.training, self.config.bias_dropout_fusion)(
            out_with_bias, residual, self.hidden_dropout
        )

    def _sa_block(self, x: Tensor, attention_mask, rotary_pos_emb, packed_seq_params):
        return self.self_attention(self.input_layernorm(x), attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)

    def _casa_block(self, x: Tensor, norm, image_states: Tensor, vision: VisionContext):
        if self.normalize_images:
            image_states = norm(image_states)  # [si(/tp), b, h]: per token, so SP slices are fine
        out, bias = self.casa_attention(norm(x), image_states, vision)  # [s(/tp), b, h]
        if self.casa_gate is not None:
            g = torch.tanh(self.casa_gate).to(out.dtype)
            out, bias = out * g, (bias * g if bias is not None else None)
        return out, bias

    def _mlp_block(self, h: Tensor) -> Tensor:
        return self._bda(self.mlp_bda, self.mlp(self.pre_mlp_layernorm(h)), h)

    def forward(self, hidden_states: Tensor, image_states: Tensor, vision: VisionContext,
                attention_mask: Optional[Tensor] = None, packed_seq_params=None) -> Tensor:
        """Self-attention over packed samples: ``packed_seq_params`` (cu_seqlens) or a dense mask."""
        x = hidden_states  # [s, b, h]
        rope, packed = vision.text_rotary, packed_seq_params
        if self.placement == "parallel":
            h = self._bda(self.self_attn_bda, self._sa_block(x, attention_mask, rope, packed), x)
            h = self._bda(self.casa_bda, self._casa_block(x, self.casa_layernorm, image_states, vision), h)
        elif self.placement == "before":
            x = self._bda(self.casa_bda, self._casa_block(x, self.casa_layernorm, image_states, vision), x)
            h = self._bda(self.self_attn_bda, self._sa_block(x, attention_mask, rope, packed), x)
        else:  # replace
            h = self._bda(self.casa_bda, self._casa_block(x, self.input_layernorm, image_states, vision), x)
        return self._mlp_block(h)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        mapping = {f"{prefix}{k}": f"{prefix}{v}"
                   for k, v in self.submodules_config.sharded_state_dict_keys_map.items()}
        if mapping:
            apply_prefix_mapping(sharded, mapping)
        return sharded


def _copy_norm(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    dst_state = dst.state_dict()
    for name, value in src.state_dict().items():
        if name in dst_state and torch.is_tensor(value):
            dst_state[name].copy_(value)

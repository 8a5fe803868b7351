"""Layer structure as data: the one place that chooses Transformer Engine or local classes.

``lm_layer_specs`` returns one ``ModuleSpec`` per global LM layer: megatron's own GPT layer
where there is no fusion, a :class:`CASATransformerLayer` where the fusion config puts one.
``vision_layer_spec`` builds the ViT block. Everything else in the package builds modules from
these specs and never imports a TE class directly.
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from casa_megatron.config.schema import FusionConfig
from casa_megatron.model.casa_attention import CASAAttention, CASAAttentionSubmodules, WindowCoreAttention
from casa_megatron.model.casa_layer import CASALayerSubmodules, CASATransformerLayer
from casa_megatron.model.norm import LocalRMSNorm
from casa_megatron.model.vision.attention import VarlenVisionAttention


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a CUDA/cuDNN load failure
        return False
    return torch.cuda.is_available()


def resolve_use_te(transformer_impl: str) -> bool:
    """``auto`` picks Transformer Engine when it imports and a GPU is present."""
    if transformer_impl == "transformer_engine":
        if not te_available():
            raise RuntimeError("model.transformer_impl='transformer_engine' but Transformer Engine "
                               "is not importable or no GPU is present")
        return True
    if transformer_impl == "local":
        return False
    return te_available()


def _provider(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def _norm(use_te: bool):
    if use_te:
        return _provider(True).layer_norm(rms_norm=True, for_qk=False)
    return LocalRMSNorm


def _plain_layer_spec(use_te: bool) -> ModuleSpec:
    """megatron's own GPT layer (local: with the SP-capable norm in place of WrappedTorchNorm)."""
    if use_te:
        # TE ignores a dense mask under ``causal``; packed samples need their block-causal mask
        # honoured, so TE runs ``arbitrary`` (correct; the thd/cu_seqlens path is the faster one).
        spec = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
        attention = dataclasses.replace(spec.submodules.self_attention,
                                        params={"attn_mask_type": AttnMaskType.arbitrary})
        return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                        self_attention=attention))
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    submodules = dataclasses.replace(spec.submodules, input_layernorm=LocalRMSNorm,
                                     pre_mlp_layernorm=LocalRMSNorm)
    return dataclasses.replace(spec, submodules=submodules)


def _self_attention_spec(provider, use_te: bool) -> ModuleSpec:
    # Unfused norm + linear even under TE so CASA can copy / share SA projections exactly.
    # The dense block-causal mask is honoured by megatron's local attention under ``causal``;
    # TE needs ``arbitrary`` for it (see _plain_layer_spec).
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary if use_te else AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def _window_backend(use_te: bool, attention_backend: str) -> str:
    """``auto`` follows the layer implementation: TE's thd kernel under TE, torch otherwise."""
    if attention_backend == "auto":
        return "te" if use_te else "torch"
    return attention_backend


def casa_attention_spec(use_te: bool, text_keys: bool, image_position_scheme: str,
                        attention_backend: str) -> ModuleSpec:
    provider = _provider(use_te)
    backend = _window_backend(use_te, attention_backend)
    return ModuleSpec(
        module=CASAAttention,
        params={"text_keys": text_keys, "image_position_scheme": image_position_scheme},
        submodules=CASAAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=ModuleSpec(module=WindowCoreAttention, params={"backend": backend}),
            linear_proj=provider.row_parallel_linear(),
        ),
    )


def casa_layer_spec(use_te: bool, fusion: FusionConfig, attention_backend: str = "auto") -> ModuleSpec:
    provider = _provider(use_te)
    plain = _plain_layer_spec(use_te).submodules
    norm = _norm(use_te)
    keys_map = {k: v for k, v in plain.sharded_state_dict_keys_map.items()
                if k.startswith("pre_mlp_layernorm")}
    return ModuleSpec(
        module=CASATransformerLayer,
        params={"placement": fusion.placement, "share_projections": fusion.share_projections,
                "normalize_images": fusion.normalize_images},
        submodules=CASALayerSubmodules(
            input_layernorm=norm,
            self_attention=_self_attention_spec(provider, use_te),
            self_attn_bda=get_bias_dropout_add,
            casa_layernorm=norm,
            casa_attention=casa_attention_spec(
                use_te, fusion.mechanism == "casa", fusion.image_position_scheme, attention_backend
            ),
            casa_bda=get_bias_dropout_add,
            pre_mlp_layernorm=plain.pre_mlp_layernorm,
            mlp=plain.mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def lm_layer_specs(num_layers: int, fusion: FusionConfig, use_te: bool,
                   attention_backend: str = "auto") -> List[ModuleSpec]:
    """One spec per global LM layer (index 0 .. num_layers-1)."""
    fused = set(fusion.fusion_layers(num_layers))
    plain, casa = _plain_layer_spec(use_te), casa_layer_spec(use_te, fusion, attention_backend)
    return [casa if i in fused else plain for i in range(num_layers)]


def final_norm_spec(use_te: bool):
    return _norm(use_te)


def vision_layer_spec(use_te: bool, attention_backend: str = "auto") -> ModuleSpec:
    """Bidirectional ViT block (RMSNorm, SwiGLU, QKV bias); attention per image / frame / window
    through the varlen window-attention interface (segments come in ``packed_seq_params``)."""
    provider = _provider(use_te)
    norm = _norm(use_te)
    backend = _window_backend(use_te, attention_backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=provider.column_parallel_linear(),
                    core_attention=ModuleSpec(module=VarlenVisionAttention, params={"backend": backend}),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=provider.column_parallel_linear(),
                linear_fc2=provider.row_parallel_linear(),
            )),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def projector_submodules(use_te: bool) -> MLPSubmodules:
    provider = _provider(use_te)
    return MLPSubmodules(linear_fc1=provider.column_parallel_linear(),
                         linear_fc2=provider.row_parallel_linear())

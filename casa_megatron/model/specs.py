"""Layer structure as data: the one place that chooses Transformer Engine or local classes.

``lm_layer_specs`` returns one ``ModuleSpec`` per global LM layer: megatron's own GPT layer
where there is no fusion, a :class:`CASATransformerLayer` where the fusion config puts one.
``vision_layer_spec`` builds the ViT block. Everything else in the package builds modules from
these specs and never imports a TE class directly.

LM self-attention over packed samples (``packed``, the default): the core attention is
:class:`PackedCoreAttention` under both the local and the TE spec (cu_seqlens per packed sample
through the window-attention kernels; ``model/packed_attention.py`` says why not megatron's own
``thd`` path). ``packed=False`` keeps the dense block-causal mask path: megatron's core
attention, ``causal`` locally and ``arbitrary`` under TE (TE ignores a dense mask under
``causal``).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

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

from casa_megatron.config.schema import FusionConfig, LoRAConfig
from casa_megatron.model.casa_attention import CASAAttention, CASAAttentionSubmodules, WindowCoreAttention
from casa_megatron.model.casa_layer import CASALayerSubmodules, CASATransformerLayer
from casa_megatron.model.norm import LocalRMSNorm
from casa_megatron.model.packed_attention import PackedCoreAttention


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


def _qk_norm(use_te: bool, qk_layernorm: bool):
    """The per-head query / key norm of an attention spec: RMSNorm over head_dim (Qwen3), or none."""
    if not qk_layernorm:
        return IdentityOp
    if use_te:
        return _provider(True).layer_norm(rms_norm=True, for_qk=True)
    return LocalRMSNorm


def _with_qk_norm(attention: ModuleSpec, use_te: bool, qk_layernorm: bool) -> ModuleSpec:
    norm = _qk_norm(use_te, qk_layernorm)
    return dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, q_layernorm=norm, k_layernorm=norm))


def _packed_core(attention_backend: str) -> ModuleSpec:
    return ModuleSpec(module=PackedCoreAttention, params={"backend": attention_backend})


def _with_packed_core(attention: ModuleSpec, use_te: bool, packed: bool,
                      attention_backend: str) -> ModuleSpec:
    """A SelfAttention spec with the packed core attention, or the dense-mask mask type."""
    if packed:
        submodules = dataclasses.replace(attention.submodules,
                                         core_attention=_packed_core(attention_backend))
        return dataclasses.replace(attention, submodules=submodules,
                                   params={"attn_mask_type": AttnMaskType.causal})
    # TE ignores a dense mask under ``causal``: packed samples need ``arbitrary`` (slow).
    mask_type = AttnMaskType.arbitrary if use_te else AttnMaskType.causal
    return dataclasses.replace(attention, params={"attn_mask_type": mask_type})


def _plain_layer_spec(use_te: bool, packed: bool = True, attention_backend: str = "auto",
                      unfused_norms: bool = False, qk_layernorm: bool = False) -> ModuleSpec:
    """megatron's own GPT layer (local: with the SP-capable norm in place of WrappedTorchNorm).

    ``unfused_norms`` (TE only): the input and pre-MLP norms as modules before plain
    ``linear_qkv`` / ``linear_fc1``, as the local layer has them, because a LoRA adapter of
    those linears needs the normalised input that TE's fused norm+linear never exposes. The
    checkpoint keys stay those of the fused layer (the local layer's key map)."""
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    if use_te:
        # TE fuses the norms into linear_qkv / linear_fc1, which read ``config.normalization``
        # (megatron-core 0.16.1's TE spec takes no ``normalization`` argument: passing one raised
        # TypeError, found by building the TE spec against a real TE on the CPU machine).
        spec = get_gpt_layer_with_transformer_engine_spec()
        submodules = spec.submodules
        if unfused_norms:
            provider, norm = _provider(True), _norm(True)
            attention = submodules.self_attention
            attention = dataclasses.replace(attention, submodules=dataclasses.replace(
                attention.submodules, linear_qkv=provider.column_parallel_linear()))
            mlp = dataclasses.replace(submodules.mlp, submodules=dataclasses.replace(
                submodules.mlp.submodules, linear_fc1=provider.column_parallel_linear()))
            submodules = dataclasses.replace(
                submodules, input_layernorm=norm, self_attention=attention, pre_mlp_layernorm=norm, mlp=mlp,
                sharded_state_dict_keys_map=dict(local.submodules.sharded_state_dict_keys_map))
    else:
        spec = local
        submodules = dataclasses.replace(spec.submodules, input_layernorm=LocalRMSNorm,
                                         pre_mlp_layernorm=LocalRMSNorm)
    attention = _with_packed_core(submodules.self_attention, use_te, packed, attention_backend)
    attention = _with_qk_norm(attention, use_te, qk_layernorm)
    return dataclasses.replace(spec, submodules=dataclasses.replace(submodules, self_attention=attention))


def _self_attention_spec(provider, use_te: bool, packed: bool = True,
                         attention_backend: str = "auto", qk_layernorm: bool = False) -> ModuleSpec:
    # Unfused norm + linear even under TE so CASA can copy / share SA projections exactly.
    spec = ModuleSpec(
        module=SelfAttention,
        submodules=SelfAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=_qk_norm(use_te, qk_layernorm),
            k_layernorm=_qk_norm(use_te, qk_layernorm),
        ),
    )
    return _with_packed_core(spec, use_te, packed, attention_backend)


def casa_attention_spec(use_te: bool, text_keys: bool, image_position_scheme: str,
                        attention_backend: str, image_kv_only: bool = True,
                        qk_layernorm: bool = False) -> ModuleSpec:
    """``attention_backend='auto'`` is resolved per call by the kernels (flash-attn, TE, torch
    varlen on CUDA half tensors; the padded torch path otherwise)."""
    provider = _provider(use_te)
    return ModuleSpec(
        module=CASAAttention,
        params={"text_keys": text_keys, "image_position_scheme": image_position_scheme,
                "image_kv_only": image_kv_only},
        submodules=CASAAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=ModuleSpec(module=WindowCoreAttention, params={"backend": attention_backend}),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=_qk_norm(use_te, qk_layernorm),
            k_layernorm=_qk_norm(use_te, qk_layernorm),
        ),
    )


def casa_layer_spec(use_te: bool, fusion: FusionConfig, attention_backend: str = "auto",
                    packed: bool = True, unfused_norms: bool = False, qk_layernorm: bool = False) -> ModuleSpec:
    provider = _provider(use_te)
    plain = _plain_layer_spec(use_te, packed, attention_backend, unfused_norms).submodules
    norm = _norm(use_te)
    keys_map = {k: v for k, v in plain.sharded_state_dict_keys_map.items()
                if k.startswith("pre_mlp_layernorm")}
    return ModuleSpec(
        module=CASATransformerLayer,
        params={"placement": fusion.placement, "share_projections": fusion.share_projections,
                "normalize_images": fusion.normalize_images},
        submodules=CASALayerSubmodules(
            input_layernorm=norm,
            self_attention=_self_attention_spec(provider, use_te, packed, attention_backend, qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            casa_layernorm=norm,
            casa_attention=casa_attention_spec(
                use_te, fusion.mechanism == "casa", fusion.image_position_scheme, attention_backend,
                fusion.image_kv_only, qk_layernorm,
            ),
            casa_bda=get_bias_dropout_add,
            pre_mlp_layernorm=plain.pre_mlp_layernorm,
            mlp=plain.mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def lm_layer_specs(num_layers: int, fusion: FusionConfig, use_te: bool,
                   attention_backend: str = "auto", packed: bool = True,
                   lora: Optional[LoRAConfig] = None, qk_layernorm: bool = False) -> List[ModuleSpec]:
    """One spec per global LM layer (index 0 .. num_layers-1). ``packed``: self-attention over
    packed samples by cu_seqlens (no dense mask); False = the dense block-causal mask path.
    ``lora``: layers whose ``linear_qkv`` / ``linear_fc1`` get adapters keep their norms unfused.
    ``qk_layernorm``: per-head query / key RMSNorms in every attention (Qwen3)."""
    fused = set(fusion.fusion_layers(num_layers))
    specs = {}  # (fused, unfused norms) -> the one spec those layers share

    def spec(i: int) -> ModuleSpec:
        key = (i in fused, lora is not None and any(lora.adapts(t, i) for t in ("linear_qkv", "linear_fc1")))
        if key not in specs:
            specs[key] = (casa_layer_spec(use_te, fusion, attention_backend, packed, key[1], qk_layernorm) if key[0]
                          else _plain_layer_spec(use_te, packed, attention_backend, key[1], qk_layernorm))
        return specs[key]

    return [spec(i) for i in range(num_layers)]


def final_norm_spec(use_te: bool):
    return _norm(use_te)


def vision_layer_spec(use_te: bool, attention_backend: str = "auto") -> ModuleSpec:
    """Bidirectional ViT block (RMSNorm, SwiGLU, QKV bias); attention per image / frame / window
    through the packed core attention, non-causal (segments come in ``packed_seq_params``)."""
    provider = _provider(use_te)
    norm = _norm(use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=provider.column_parallel_linear(),
                    core_attention=ModuleSpec(module=PackedCoreAttention,
                                              params={"backend": attention_backend, "causal": False}),
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

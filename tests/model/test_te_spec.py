"""The Transformer Engine layer specs assemble, without Transformer Engine.

The TE spec is built only where TE imports and a GPU exists, so on the CPU machines its assembly
never ran, and the first run of it would have been a lent GPU session's: it raised ``TypeError:
get_gpt_layer_with_transformer_engine_spec() got an unexpected keyword argument 'normalization'``
(megatron-core 0.16.1's TE spec takes none), which would have cost every TE part of the te round.
Found by building the specs against a real TE on the CPU machine (``tools/gpu/prebuild_te.sh``);
here a stand-in for megatron's ``TESpecProvider`` hands out one placeholder class per provider
method, so the whole spec tree -- megatron's own TE layer and ours around it -- is assembled in CI
and its structure checked: where TE fuses the norm into the next linear, and where ours keeps the
projections unfused so that CASA can copy or share the self-attention weights.
"""

from __future__ import annotations

import pytest
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from casa_megatron.config.schema import FusionConfig


class FakeTESpecProvider:
    """One placeholder class per provider method (named ``TE.<method>``), as TESpecProvider's
    methods return TE classes; TE fuses norms into linears."""

    def __init__(self, *args, **kwargs):
        pass

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return type(f"TE.layer_norm(rms_norm={rms_norm}{', for_qk=True' if for_qk else ''})", (), {})

    def activation_func(self):
        return None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: type(f"TE.{name}", (), {})


@pytest.fixture
def te_specs(monkeypatch):
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs

    from casa_megatron.model import specs

    monkeypatch.setattr(gpt_specs, "TESpecProvider", FakeTESpecProvider, raising=False)
    monkeypatch.setattr(specs, "_provider", lambda use_te: FakeTESpecProvider() if use_te
                        else specs.LocalSpecProvider())
    return specs


def _name(module) -> str:
    return getattr(module, "__name__", type(module).__name__)


def _all_modules(spec):
    """Every module class of a spec tree."""
    if isinstance(spec, ModuleSpec):
        yield spec.module
        sub = spec.submodules
        if sub is not None:
            for value in vars(sub).values() if hasattr(sub, "__dict__") else ():
                yield from _all_modules(value)
    elif isinstance(spec, type):
        yield spec


@pytest.mark.parametrize("packed", [True, False])
def test_te_lm_layers_assemble_with_fused_norms_and_unfused_casa_projections(te_specs, packed):
    from casa_megatron.model.casa_layer import CASATransformerLayer
    from casa_megatron.model.packed_attention import PackedCoreAttention

    layers = te_specs.lm_layer_specs(4, FusionConfig(every_n=2), use_te=True, packed=packed)
    plain, casa = layers[0], layers[1]
    assert [_name(s.module) for s in layers] == ["TransformerLayer", "CASATransformerLayer"] * 2
    assert casa.module is CASATransformerLayer

    # megatron's TE layer: the input norm lives in linear_qkv, the MLP norm in linear_fc1
    p = plain.submodules
    assert p.input_layernorm is IdentityOp and p.pre_mlp_layernorm is IdentityOp
    assert _name(p.self_attention.submodules.linear_qkv) == "TE.column_parallel_layer_norm_linear"
    assert _name(p.mlp.submodules.linear_fc1) == "TE.column_parallel_layer_norm_linear"
    core = p.self_attention.submodules.core_attention
    if packed:  # packed samples by cu_seqlens, no dense mask
        assert core.module is PackedCoreAttention and p.self_attention.params["attn_mask_type"].name == "causal"
    else:  # TE ignores a dense mask under ``causal``
        assert _name(core) == "TE.core_attention" and p.self_attention.params["attn_mask_type"].name == "arbitrary"

    # ours: RMSNorm modules and plain linears, so CASA can copy or share the SA projections
    c = casa.submodules
    assert _name(c.input_layernorm) == _name(c.casa_layernorm) == "TE.layer_norm(rms_norm=True)"
    for attention in (c.self_attention, c.casa_attention):
        assert _name(attention.submodules.linear_qkv) == "TE.column_parallel_linear"
        assert _name(attention.submodules.linear_proj) == "TE.row_parallel_linear"
    assert c.pre_mlp_layernorm is IdentityOp  # the MLP as megatron's TE layer has it: norm fused into fc1
    assert _name(c.mlp.submodules.linear_fc1) == "TE.column_parallel_layer_norm_linear"
    assert not any(_name(m).startswith("Local") for layer in layers for m in _all_modules(layer))


def test_te_vision_layer_and_final_norm_assemble(te_specs):
    vision = te_specs.vision_layer_spec(use_te=True)
    sub = vision.submodules
    assert _name(sub.input_layernorm) == _name(sub.pre_mlp_layernorm) == "TE.layer_norm(rms_norm=True)"
    assert _name(sub.self_attention.submodules.linear_qkv) == "TE.column_parallel_linear"
    assert _name(sub.mlp.submodules.linear_fc2) == "TE.row_parallel_linear"
    assert _name(te_specs.final_norm_spec(True)) == "TE.layer_norm(rms_norm=True)"


def test_te_layers_with_lora_keep_norms_unfused_where_adapters_read_them(te_specs):
    """A LoRA adapter of ``linear_qkv`` / ``linear_fc1`` needs the normalised input, which TE's
    fused norm+linear never exposes: adapted layers get norm modules and plain linears (plain
    and CASA layers alike), under the fused layer's checkpoint keys; other layers stay fused."""
    from casa_megatron.config import LoRAConfig

    lora = LoRAConfig(rank=4, layers=[0, 1])
    layers = te_specs.lm_layer_specs(4, FusionConfig(every_n=2), use_te=True, lora=lora)
    norm = "TE.layer_norm(rms_norm=True)"
    for adapted in layers[:2]:
        sub = adapted.submodules
        assert _name(sub.input_layernorm) == _name(sub.pre_mlp_layernorm) == norm
        assert _name(sub.self_attention.submodules.linear_qkv) == "TE.column_parallel_linear"
        assert _name(sub.mlp.submodules.linear_fc1) == "TE.column_parallel_linear"
        assert sub.sharded_state_dict_keys_map["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"
    assert layers[0].submodules.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    for fused in layers[2:]:
        assert _name(fused.submodules.mlp.submodules.linear_fc1) == "TE.column_parallel_layer_norm_linear"
    # only the row-parallel linears adapted: nothing to unfuse
    rows = te_specs.lm_layer_specs(4, FusionConfig(every_n=2), use_te=True,
                                   lora=LoRAConfig(rank=4, targets=["linear_proj", "linear_fc2"]))
    assert _name(rows[0].submodules.self_attention.submodules.linear_qkv) == "TE.column_parallel_layer_norm_linear"


@pytest.mark.parametrize("use_te", [True, False], ids=["te", "local"])
def test_qk_layernorm_puts_per_head_norms_in_every_lm_attention(te_specs, use_te):
    """Qwen3: megatron's self-attention (plain and CASA layers) and CASA's own attention get
    q/k norms (TE's qk norm, or our SP-capable RMSNorm locally); without it, identities."""
    from casa_megatron.model.norm import LocalRMSNorm

    expected = "TE.layer_norm(rms_norm=True, for_qk=True)" if use_te else LocalRMSNorm.__name__
    for qk in (True, False):
        layers = te_specs.lm_layer_specs(4, FusionConfig(every_n=2), use_te=use_te, qk_layernorm=qk)
        attentions = [layers[0].submodules.self_attention, layers[1].submodules.self_attention,
                      layers[1].submodules.casa_attention]
        for attention in attentions:
            sub = attention.submodules
            assert _name(sub.q_layernorm) == _name(sub.k_layernorm) == (expected if qk else "IdentityOp"), attention
    vision = te_specs.vision_layer_spec(use_te=use_te).submodules.self_attention.submodules
    assert vision.q_layernorm is IdentityOp  # the encoder has none

"""An HF Qwen2.5-VL ``vision_config`` -> ``model.vision`` fields (``VisionConfig``).

The HF config decides the architecture; the recipe keeps what is about training
(``trainable_blocks``, ``projector_trainable``). The merger's output width
(``out_hidden_size``) is not a vision field: our projector always maps to the LM width, so the
importer compares it with the LM (``hf_config.HFArchitecture.vision_output_size``) and starts
the projector fresh when they differ. Registered in ``hf_config.VISION_CONFIG_READERS``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from casa_megatron.config.errors import ConfigError

# MLP widths that TP = 2, 4, 8 cannot split are padded with exact zero units to this multiple.
FFN_PAD_MULTIPLE = 8


def _rope_theta(d: Mapping[str, Any]) -> float:
    params = d.get("rope_parameters") or {}
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def _single(value, name: str) -> int:
    """HF allows ``patch_size`` as an int or a pair; we need one square size."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config.{name}={value}: only square / uniform sizes are supported")
        value = value[0]
    return int(value)


def vision_config_from_hf(d: Mapping[str, Any]) -> Dict[str, Any]:
    """HF ``vision_config`` dict (Qwen2.5-VL, ``model_type`` ``qwen2_5_vl`` or ``qwen2_5_vl_vision``)
    -> dict of ``VisionConfig`` fields. Raises ConfigError naming an unsupported value."""
    model_type = d.get("model_type", "qwen2_5_vl_vision")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_vision"):
        raise ConfigError(f"vision_config.model_type={model_type!r}: only the Qwen2.5-VL vision encoder "
                          "('qwen2_5_vl_vision') is supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"vision_config.hidden_act={act!r}: the encoder's MLP is SwiGLU ('silu')")
    intermediate = int(d.get("intermediate_size", 3420))
    return {
        "encoder": "qwen2_5_vl",
        "num_layers": int(d.get("depth", d.get("num_hidden_layers", 32))),
        "hidden_size": int(d.get("hidden_size", 1280)),
        "num_attention_heads": int(d.get("num_heads", d.get("num_attention_heads", 16))),
        "ffn_hidden_size": intermediate,
        "patch_size": _single(d.get("patch_size", 14), "patch_size"),
        "in_channels": int(d.get("in_channels", d.get("in_chans", 3))),
        "spatial_merge_size": int(d.get("spatial_merge_size", 2)),
        "temporal_patch_size": _single(d.get("temporal_patch_size", 2), "temporal_patch_size"),
        "window_size": int(d.get("window_size", 112)),
        "fullatt_block_indexes": [int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))],
        "rope_theta": _rope_theta(d),
        "tokens_per_second": float(d.get("tokens_per_second", 2)),
        "norm_epsilon": 1e-6,  # hard-coded in transformers' Qwen2.5-VL vision blocks and merger
        "ffn_pad_multiple": 1 if intermediate % FFN_PAD_MULTIPLE == 0 else FFN_PAD_MULTIPLE,
    }

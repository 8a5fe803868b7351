"""CASA attention as a megatron-core submodule.

Text queries attend, in one softmax, to ``[image tokens of their window] ++ [window text <= t]``.
Images are keys/values only. CASA projections keep exactly the layout of the backbone's
self-attention (one fused QKV weight) — which makes initialising from SA a copy, sharing SA
projections a reference, and the Hugging Face mapping identical to SA's. Image tokens go through
the K/V rows of that weight only (``model/kv_projection.py``; ``image_kv_only=False`` runs the
whole fused QKV on them and discards the queries, the old path).

Sequence parallelism: text arrives as [s/tp, b, h] and images as [si/tp, b, h]; each is
projected with megatron's own SP path (all-gather along the sequence in forward, reduce-scatter
of the input gradient in backward), for the local and the shared-projection variants alike;
``linear_proj`` reduce-scatters.

Per-head query / key norms (``q_layernorm`` / ``k_layernorm``, Qwen3's ``q_norm`` / ``k_norm``)
apply before RoPE to text queries and to text *and* image keys, as the backbone's self-attention
applies them to its tokens; they are named as megatron's so that ``finalize_model_grads`` sums
their gradients over TP (each rank sees only its heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.model.kernels import window_attention
from casa_megatron.model.kv_projection import project_kv, supports_kv_only
from casa_megatron.model.rope import rotate
from casa_megatron.model.vision_context import VisionContext


class WindowCoreAttention(torch.nn.Module):
    """Attention over packed windows; the kernel is chosen by the spec (torch / flash / te)."""

    def __init__(self, config: TransformerConfig, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                causal_bottom_right: bool, softmax_scale: float) -> Tensor:
        # q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d]
        return window_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
            causal_bottom_right=causal_bottom_right, softmax_scale=softmax_scale,
            backend=self.backend,
        )


@dataclass
class CASAAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type, None] = None
    core_attention: Union[ModuleSpec, type] = WindowCoreAttention
    linear_proj: Union[ModuleSpec, type, None] = None
    q_layernorm: Union[ModuleSpec, type] = IdentityOp
    k_layernorm: Union[ModuleSpec, type] = IdentityOp


class CASAAttention(MegatronModule):
    """CASA (``text_keys=True``) or vanilla cross-attention (``text_keys=False``).

    With ``shared_projections`` given (the layer's SA ``(linear_qkv, linear_proj)``, and its
    ``(q_layernorm, k_layernorm)`` after them when it has them), no projection parameters are
    created: CASA reuses the self-attention's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: CASAAttentionSubmodules,
        layer_number: int,
        text_keys: bool = True,
        image_position_scheme: str = "insertion",
        shared_projections: Optional[Tuple[torch.nn.Module, torch.nn.Module]] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        image_kv_only: bool = True,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number
        self.text_keys = text_keys
        self.image_position_scheme = image_position_scheme
        self.image_kv_only = image_kv_only
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.head_dim = config.kv_channels
        self.heads = config.num_attention_heads // tp  # local query heads
        self.groups = config.num_query_groups // tp  # local KV heads
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_query_groups * self.head_dim

        self.core_attention = build_module(submodules.core_attention, config=config)
        if shared_projections is not None:
            # A plain tuple is not registered: the parameters stay owned by self-attention.
            shared = tuple(shared_projections)
            self._shared = shared[:2]
            self._shared_norms = shared[2:4] if len(shared) > 2 else (IdentityOp(), IdentityOp())
            return
        self._shared = None
        self.q_layernorm, self.k_layernorm = (
            build_module(spec, hidden_size=self.head_dim, config=config, eps=config.layernorm_epsilon)
            for spec in (submodules.q_layernorm, submodules.k_layernorm))
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, q_size + 2 * kv_size,
            config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=pg_collection.tp,
        )
        self.linear_proj = build_module(
            submodules.linear_proj, q_size, config.hidden_size,
            config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="proj", tp_group=pg_collection.tp,
        )

    @property
    def projections(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        if self._shared is not None:
            return self._shared
        return self.linear_qkv, self.linear_proj

    @property
    def qk_norms(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """(query norm, key norm) over head_dim; identities for a backbone without them."""
        if self._shared is not None:
            return self._shared_norms
        return self.q_layernorm, self.k_layernorm

    def _split_qkv(self, mixed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """[n, b, ng*(np/ng+2)*hn] (megatron's grouped layout) -> q [n,b,np,hn], k/v [n,b,ng,hn]."""
        n, b = mixed.shape[:2]
        per_group = self.heads // self.groups
        mixed = mixed.view(n, b, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(mixed, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=3)
        return q.reshape(n, b, self.heads, self.head_dim), k, v

    def _image_kv(self, linear_qkv, image_states: Tensor) -> Tuple[Tensor, Tensor]:
        """image_states [si(/tp), b, h] -> k, v [si, b, ng, hn]: the K/V rows only when possible."""
        if self.image_kv_only and supports_kv_only(linear_qkv):
            return project_kv(linear_qkv, image_states, self.groups, self.heads // self.groups,
                              self.head_dim, self.config, self.tp_group)
        image_qkv, _ = linear_qkv(image_states)  # [si, b, (np+2ng)*hn]; queries discarded
        _, k_image, v_image = self._split_qkv(image_qkv)
        return k_image, v_image

    def forward(self, hidden_states: Tensor, image_states: Tensor, vision: VisionContext):
        """hidden_states [s(/tp), b, h], image_states [si(/tp), b, h] -> ([s(/tp), b, h], bias)."""
        linear_qkv, linear_proj = self.projections
        q_norm, k_norm = self.qk_norms
        windows = vision.windows
        text_qkv, _ = linear_qkv(hidden_states)  # [s, b, (np+2ng)*hn]
        q_text, k_text, v_text = self._split_qkv(text_qkv)
        k_image, v_image = self._image_kv(linear_qkv, image_states)  # [si, b, ng, hn] each
        q_text, k_text, k_image = q_norm(q_text), k_norm(k_text), k_norm(k_image)  # per head, before RoPE
        s, b = q_text.shape[:2]

        # Flatten row-major ([s, b] -> [b*s]) so windows are contiguous runs of tokens.
        q = q_text.transpose(0, 1).reshape(b * s, self.heads, self.head_dim)  # [t, np, hn]
        text_freqs = vision.text_rotary.transpose(0, 1).reshape(b * s, 1, -1)  # [t, 1, hn]
        q = rotate(q, text_freqs, self.config)
        n_img = vision.num_image_tokens
        # Image slots [si, b] flatten slot-major; the first n_img rows are real tokens.
        k_img = k_image.reshape(-1, self.groups, self.head_dim)[:n_img]  # [i, ng, hn]
        v_img = v_image.reshape(-1, self.groups, self.head_dim)[:n_img]
        if vision.image_rotary is not None:
            k_img = rotate(k_img, vision.image_rotary, self.config)

        if self.text_keys:
            k_txt = k_text.transpose(0, 1).reshape(b * s, self.groups, self.head_dim)
            v_txt = v_text.transpose(0, 1).reshape(b * s, self.groups, self.head_dim)
            k_txt = rotate(k_txt, text_freqs, self.config)
            k = torch.cat([k_txt, k_img])[windows.kv_index]  # [tk, ng, hn], images first per window
            v = torch.cat([v_txt, v_img])[windows.kv_index]
            cu_kv, max_kv = windows.cu_seqlens_kv, windows.max_seqlen_kv
        else:
            k, v = k_img[windows.image_kv_index], v_img[windows.image_kv_index]
            cu_kv, max_kv = windows.cu_seqlens_image, windows.max_seqlen_image

        out = self.core_attention(
            q, k, v, windows.cu_seqlens_q, cu_kv, windows.max_seqlen_q, max_kv,
            causal_bottom_right=self.text_keys, softmax_scale=self.softmax_scale,
        )  # [t, np, hn]
        out = out.reshape(b, s, self.heads * self.head_dim).transpose(0, 1).contiguous()  # [s, b, np*hn]
        return linear_proj(out)  # ([s(/tp), b, h], bias)

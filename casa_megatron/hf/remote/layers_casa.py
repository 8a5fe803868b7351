"""Text-side building blocks of the exported CASA model, one batch row at a time (``[n, h]``).

Every attention call takes the row's cache entry and *appends* to it, so one code path serves
full recomputation (a fresh cache) and cached generation (a persistent one). Keys always come
"past first": a bottom-right-aligned causal mask over ``[cached ++ new]`` keys is exact for
self-attention, and for CASA, whose keys are ``[window images ++ window text]`` (images first),
it is exactly CASA's mask (image keys visible to every query, text keys causal).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache_casa import GrowingKV, WindowKV


class CasaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the families' own HF norms) and cast back."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class Rotary(nn.Module):
    """RoPE at explicit positions. ``interleaved``: Helium's pairs (x0,x1),(x2,x3)...; otherwise
    the rotate-half layout of Qwen2 / Llama. Frequencies come from the config's
    ``rope_parameters`` through transformers' own initialisers (llama3 / yarn scaling included)."""

    def __init__(self, config):
        super().__init__()
        inv_freq, self.scaling = self.frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = config.rope_interleaved
        self.config = config

    @staticmethod
    def frequencies(config) -> Tuple[torch.Tensor, float]:
        """(inv_freq [d/2], attention scaling). Also called from ``_init_weights``: transformers
        builds models on the meta device, so non-persistent buffers must be recomputed there."""
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            d = config.head_dim
            return 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [n] -> cos, sin [n, d]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]  # [n, d/2]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def cos_sin_multimodal(self, positions: torch.Tensor, section, dtype: torch.dtype):
        """positions [3, n] (t, h, w) -> cos, sin [n, d]: each rotary frequency turns by the
        position of its section (Qwen2.5-VL's M-RoPE), in this backbone's layout. A token with
        t = h = w gets exactly :meth:`cos_sin`."""
        half = self.inv_freq.shape[0]
        bounds = torch.tensor([section[0], section[0] + section[1]])
        which = torch.bucketize(torch.arange(half), bounds, right=True).to(positions.device)  # [d/2]
        pos = positions.float()[which]  # [d/2, n]: each frequency's own position
        freqs = pos.transpose(0, 1) * self.inv_freq.to(positions.device)[None]  # [n, d/2]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def rotate(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """x [heads, n, d]."""
        cos, sin = cos_sin
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            half = x.shape[-1] // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """torch's flash varlen kernel (CUDA builds of torch >= 2.10) and its parameter names, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_kernel(q: torch.Tensor):
    """The flash varlen kernel for CUDA fp16/bf16 queries whose head_dim it takes (a multiple of 8)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0):
        return None
    return _flash_varlen()


def _attend_varlen(kernel, q, k, v, scale):
    """One sequence through ``varlen_attn``, called the way the installed torch spells it: torch
    2.13 takes ``scale`` / ``window_size=(-1, 0)`` / ``enable_gqa``; torch 2.10 ``is_causal`` and
    no GQA flag (K/V heads repeated) nor scale (queries pre-scaled). Flash's causal mask is
    bottom-right aligned either way. q [H, n, d], k/v [KV, L, d] -> [n, H*d]."""
    varlen, params = kernel
    n, length, heads = q.shape[1], k.shape[1], q.shape[0]
    q, k, v = (x.transpose(0, 1).contiguous() for x in (q, k, v))  # [n, H, d], [L, KV, d]
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's default is 1/sqrt(head_dim)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, length], dtype=torch.int32, device=q.device)
    return varlen(q, k, v, cu_q, cu_k, n, length, **kwargs).reshape(n, -1)  # [n, H*d]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, n, d], k/v [KV, L, d] (L >= n; the last n keys are the queries' own tokens)
    -> [n, H*d]. Bottom-right causal: query i sees keys 0 .. L-n+i.

    GPU (fp16/bf16): torch's flash varlen kernel, whose causal mask is bottom-right aligned.
    Elsewhere: a single query (decoding) by two grouped matmuls (SDPA's CPU kernel expands K/V for
    GQA: an O(cache) copy per step), several by SDPA with a lower-right causal bias."""
    n, length = q.shape[1], k.shape[1]
    kernel = _varlen_kernel(q)
    if kernel is not None:
        return _attend_varlen(kernel, q, k, v, scale)
    if n == 1:  # decoding: one query sees every key; grouped matmuls, K/V never expanded for GQA
        kv_heads = k.shape[0]
        qg = q.reshape(kv_heads, -1, q.shape[-1])  # [KV, H/KV, d]
        probs = (torch.matmul(qg, k.transpose(1, 2)) * scale).float().softmax(-1).to(v.dtype)  # [KV, H/KV, L]
        return torch.matmul(probs, v).reshape(1, -1)  # [1, H*d]
    mask = None
    if n > 1:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, length)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[0] != k.shape[0])[0]  # [H, n, d]
    return out.transpose(0, 1).reshape(n, -1)


def _qk_norms(config) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """Qwen3's per-head ``q_norm`` / ``k_norm`` (over head_dim) when ``qk_layernorm``, else none."""
    if not getattr(config, "qk_layernorm", False):
        return None, None
    return CasaRMSNorm(config.head_dim, config.rms_norm_eps), CasaRMSNorm(config.head_dim, config.rms_norm_eps)


def _per_head(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Qwen3's ``q_norm`` / ``k_norm`` over each head's ``d`` features ([n, heads, d]), if any."""
    return x if norm is None else norm(x)


class Projections(nn.Module):
    """q/k/v/o projections with the families' hub names (and Qwen3's per-head ``q_norm`` /
    ``k_norm``, applied before RoPE, when ``qk_layernorm``)."""

    def __init__(self, config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.q_norm, self.k_norm = _qk_norms(config)
        self.scale = d ** -0.5

    def q(self, x):  # [n, h] -> [H, n, d]
        return _per_head(self.q_norm, self.q_proj(x).view(x.shape[0], self.heads, self.head_dim)).transpose(0, 1)

    def kv(self, x):  # [n, h] -> 2 x [KV, n, d]
        shape = (x.shape[0], self.kv_heads, self.head_dim)
        k = _per_head(self.k_norm, self.k_proj(x).view(shape))
        return k.transpose(0, 1), self.v_proj(x).view(shape).transpose(0, 1)


class SelfAttention(Projections):
    def forward(self, x: torch.Tensor, rope: Rotary, cos_sin, cache: GrowingKV) -> torch.Tensor:
        q = rope.rotate(self.q(x), cos_sin)
        k, v = self.kv(x)
        k, v = cache.append(rope.rotate(k, cos_sin), v)  # text (or stream) so far
        return self.o_proj(attend(q, k, v, self.scale))


class CasaAttention(nn.Module):
    """CASA (``text_keys``) or cross-attention; projections own or borrowed from self-attention.

    Borrowed projections are kept in a plain tuple so they are not registered twice: the state
    dict then holds them only under ``self_attn.*`` (no ``casa_attn`` projection tensors)."""

    def __init__(self, config, shared: Optional[Projections] = None, gate: bool = False):
        super().__init__()
        self.text_keys = config.fusion_mechanism == "casa"
        self._proj = (shared,) if shared is not None else None
        if shared is None:
            h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
            self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=bias)
            self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
            self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
            self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
            self.q_norm, self.k_norm = _qk_norms(config)
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.scale = self.head_dim ** -0.5
        self.gate = nn.Parameter(torch.zeros(1)) if gate else None

    def _linear(self, name: str) -> nn.Linear:
        return getattr(self._proj[0], name) if self._proj is not None else getattr(self, name)

    def _kv(self, x):  # [n, h] -> 2 x [KV, n, d]
        shape = (x.shape[0], self.kv_heads, self.head_dim)
        k = _per_head(self._linear("k_norm"), self._linear("k_proj")(x).view(shape))
        return k.transpose(0, 1), self._linear("v_proj")(x).view(shape).transpose(0, 1)

    def open_window(self, images: Optional[torch.Tensor], rope: Rotary, image_cos_sin,
                    window: WindowKV) -> None:
        """Drop the previous window; compute the K/V of the new window's images [m, h] once."""
        if images is None or images.shape[0] == 0:
            window.open(None, None)
            return
        k, v = self._kv(images)  # [KV, m, d]
        if image_cos_sin is not None:
            k = rope.rotate(k, image_cos_sin)
        window.open(k, v)

    def forward(self, x: torch.Tensor, rope: Rotary, cos_sin, window: WindowKV) -> torch.Tensor:
        n = x.shape[0]
        q = _per_head(self._linear("q_norm"), self._linear("q_proj")(x).view(n, self.heads, self.head_dim))
        q = rope.rotate(q.transpose(0, 1), cos_sin)
        if self.text_keys:
            k, v = self._kv(x)
            k_txt, v_txt = window.text.append(rope.rotate(k, cos_sin), v)
            if window.image_k is not None:
                k_txt, v_txt = torch.cat([window.image_k, k_txt], 1), torch.cat([window.image_v, v_txt], 1)
            out = attend(q, k_txt, v_txt, self.scale)
        elif window.image_k is None:  # cross-attention with no image in the window: nothing to see
            out = x.new_zeros(n, self.heads * self.head_dim)
        else:
            out = F.scaled_dot_product_attention(
                q[None], window.image_k[None], window.image_v[None], scale=self.scale,
                enable_gqa=self.heads != self.kv_heads)[0].transpose(0, 1).reshape(n, -1)
        out = self._linear("o_proj")(out)
        if self.gate is not None:
            out = out * torch.tanh(self.gate).to(out.dtype)
        return out


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A backbone layer, or one holding a fusion module (placements as in casa_megatron):

    * parallel: ``h = x + SA(N1 x) + CASA(Nc x)``  * before: ``x = x + CASA(Nc x); h = x + SA(N1 x)``
    * replace: ``h = x + CASA(N1 x)`` (no self-attention); then ``out = h + MLP(N2 h)``.
    Image tokens go through the fusion's pre-attention norm (``Nc``, or ``N1`` for replace)."""

    def __init__(self, config, index: int):
        super().__init__()
        self.index = index
        self.fused = index in config.fusion_layers
        self.placement = config.fusion_placement if self.fused else None
        self.normalize_images = config.normalize_images
        eps = config.rms_norm_eps
        self.input_layernorm = CasaRMSNorm(config.hidden_size, eps)
        if self.placement != "replace":
            self.self_attn = SelfAttention(config)
        if self.fused:
            shared = self.self_attn if config.share_projections else None
            self.casa_attn = CasaAttention(config, shared, gate=config.cross_attention_gate)
            if self.placement != "replace":
                self.casa_layernorm = CasaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = CasaRMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)

    def _casa_norm(self) -> CasaRMSNorm:
        return self.input_layernorm if self.placement == "replace" else self.casa_layernorm

    def open_window(self, images, rope, image_cos_sin, window: WindowKV) -> None:
        if images is not None and self.normalize_images:
            images = self._casa_norm()(images)
        self.casa_attn.open_window(images, rope, image_cos_sin, window)

    def forward(self, x, rope, cos_sin, row) -> torch.Tensor:
        sa = lambda y: self.self_attn(self.input_layernorm(y), rope, cos_sin, row.self_attn[self.index])  # noqa: E731
        casa = lambda y: self.casa_attn(self._casa_norm()(y), rope, cos_sin, row.windows[self.index])  # noqa: E731
        if not self.fused:
            h = x + sa(x)
        elif self.placement == "parallel":
            h = x + sa(x) + casa(x)
        elif self.placement == "before":
            x = x + casa(x)
            h = x + sa(x)
        else:
            h = x + casa(x)
        return h + self.mlp(self.post_attention_layernorm(h))

"""Self-attention over packed segments, without a dense mask: causal for the LM's packed
samples, non-causal for the vision encoder's images / frames / windows (one module).

A micro-batch row holds several packed samples (``VLMBatch.sample_starts``); self-attention must
be causal inside each sample and blind across samples. The reference path builds a dense
block-causal ``[b, 1, s, s]`` mask (0.5 GB per micro-batch at a 22,528-token insertion row) and
makes Transformer Engine fall back to its ``arbitrary``-mask kernel. Here each packed sample is
one window of our window-attention interface (``model/kernels``): ``cu_seqlens`` over the
row-major flatten of ``[b, s]``, causal, queries == keys. The same kernels as CASA run it (flash-
attn, TE ``thd``, ``torch.nn.attention.varlen`` on GPU; SDPA's mask-free causal path on CPU).

Why not megatron's own ``thd`` path: megatron's ``SelfAttention`` squeezes the batch axis for
``PackedSeqParams(qkv_format="thd")``, i.e. it expects the whole micro-batch as one row
``[t, 1, h]``. Our stream is ``[s, b, h]`` with ``b`` rows, and that layout is a contract of the
pipeline p2p shapes, the sequence-parallel split and the CASA image slots. So the layers keep
``[s, b, h]``, RoPE is applied by megatron in the ``sbhd`` layout with our per-token position
frequencies (positions restart per packed sample exactly as before), and only the core attention
flattens ``[s, b]`` to packed tokens (one transpose of q/k/v and of the output; free for
``b = 1``) and calls the varlen kernel. The ``PackedSeqParams`` carry ``qkv_format="sbhd_packed"``
so megatron's ``thd`` branches stay off, and a spec that wired megatron's own core attention by
mistake would fail loudly on the unknown format instead of silently ignoring the samples.

The vision encoders use the same module with ``causal=False``: they pack every patch of a
micro-batch into one row (``[n, 1, hv]``, so the flatten is the identity) and pass one segment
per image, frame or window (``model/vision/geometry.py``); megatron applies their 2D RoPE in
``sbhd`` as for the LM.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.model.kernels import window_attention

ROW_PACKED = "sbhd_packed"  # q/k/v stay [s, b, heads, d]; cu_seqlens index the flatten of [b, s]


def segment_starts(segment_ids: Tensor) -> Tensor:
    """[b, s] sample ids -> [b, s] bool: True where a sample starts (every row start, every change)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_params(cu_seqlens: Tensor, device=None) -> PackedSeqParams:
    """``PackedSeqParams`` of segments given as cu_seqlens [n_segments + 1] (int32) over the
    row-major flatten of ``[b, s]``, moved to ``device`` (default: where they are). One host sync
    (``max_seqlen``, which the kernels need as an int; none when ``cu_seqlens`` is on the CPU),
    once per micro-batch."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    cu_seqlens = cu_seqlens.to(device) if device is not None else cu_seqlens
    return PackedSeqParams(qkv_format=ROW_PACKED, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def packed_seq_params(starts: Tensor) -> PackedSeqParams:
    """[b, s] bool sample starts -> ``PackedSeqParams`` over the row-major flatten of ``[b, s]``.

    Row starts always open a sample, so no sample crosses a row.
    """
    b, s = starts.shape
    flat = starts.reshape(b * s).clone()
    flat[::s] = True
    begin = flat.nonzero().squeeze(1)  # [n_samples]
    return segment_params(torch.cat([begin, begin.new_tensor([b * s])]).to(torch.int32))  # [n_samples + 1]


def params_from_sample_starts(sample_starts: Optional[Tensor], batch: int, seq: int,
                              device) -> PackedSeqParams:
    """``VLMBatch.sample_starts`` (or None: one sample per row) -> ``PackedSeqParams``."""
    if sample_starts is None:
        starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    else:
        starts = sample_starts.to(device=device, dtype=torch.bool)
    return packed_seq_params(starts)


class PackedCoreAttention(MegatronModule):
    """megatron core-attention interface, within packed segments, through window attention.

    Takes megatron's ``DotProductAttention`` arguments so a spec can put it in place of it:
    query [sq, b, np, hn], key/value [sq, b, ng, hn] -> [sq, b, np*hn]. ``packed_seq_params``
    (``qkv_format="sbhd_packed"``) gives the segments; without it every row is one sequence.
    ``causal``: True for the LM (causal within each packed sample), False for the vision
    encoders (every patch of a segment sees the whole segment). A dense ``attention_mask`` is
    refused: this module exists to not need one.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: str = "auto",
        causal: bool = True,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("PackedCoreAttention does not support context parallelism")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"PackedCoreAttention has no attention dropout (got {dropout}); set "
                             "attention_dropout=0 or model.packed_attention=false")
        if attention_type != "self":
            raise ValueError(f"PackedCoreAttention is self-attention, not {attention_type!r}")
        if softmax_scale is None:
            softmax_scale = getattr(config, "softmax_scale", None) or 1.0 / math.sqrt(config.kv_channels)
        self.softmax_scale = softmax_scale
        self.backend = backend
        self.causal = causal

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention takes no attention_bias")
        sq, b, heads, hn = query.shape
        if packed_seq_params is None:
            if attention_mask is not None:
                raise ValueError("PackedCoreAttention got a dense attention_mask but no packed_seq_params: "
                                 "give cu_seqlens (packed_attention.params_from_sample_starts) or build "
                                 "the model with model.packed_attention=false")
            packed_seq_params = packed_seq_params_for_rows(b, sq, query.device)
        elif packed_seq_params.qkv_format != ROW_PACKED:
            raise ValueError(f"PackedCoreAttention needs qkv_format={ROW_PACKED!r}, got "
                             f"{packed_seq_params.qkv_format!r}")
        cu = packed_seq_params.cu_seqlens_q
        longest = packed_seq_params.max_seqlen_q
        q = query.transpose(0, 1).reshape(b * sq, heads, hn)  # [t, np, hn], t = b*s row-major
        k = key.transpose(0, 1).reshape(b * sq, key.shape[2], hn)  # [t, ng, hn]
        v = value.transpose(0, 1).reshape(b * sq, value.shape[2], hn)  # [t, ng, hn]
        out = window_attention(q, k, v, cu, cu, longest, longest, causal_bottom_right=self.causal,
                               softmax_scale=self.softmax_scale, backend=self.backend)  # [t, np, hn]
        return out.view(b, sq, heads * hn).transpose(0, 1).contiguous()  # [sq, b, np*hn]


def packed_seq_params_for_rows(batch: int, seq: int, device) -> PackedSeqParams:
    """One causal sample per row (what a plain causal mask means)."""
    return params_from_sample_starts(None, batch, seq, device)

"""LoRA adapters on the linears of frozen LM layers and encoder blocks, tensor-parallel
(``model.lora``, ``model.vision.lora``).

Why here and not through a PEFT library: the adapted linears are megatron's tensor-parallel ones
(local or Transformer Engine), and a adapter must be sharded, reduced and checkpointed the way
its base linear is, under TP, sequence parallelism and pipeline stages alike.

Each adapter is a sibling module of the linear it adapts (``self_attention.linear_qkv`` gets
``self_attention.linear_qkv_lora``), and joins the linear's output through a forward hook:

    y = W x  +  (alpha / rank) * B(A(dropout(x)))      # A: [rank, in], B: [out, rank], B = 0 at start

The base linear, its parameter names and its checkpoint keys are untouched, so imported
backbones, CASA's copy of the self-attention weights and the HF mapping tables work as before.

Tensor parallelism (as Megatron-Bridge's parallel adapters):

* column-parallel base (``linear_qkv``, ``linear_fc1``; output features split over TP ranks):
  ``A`` is whole on every rank, ``B`` holds this rank's output rows (for the SwiGLU ``fc1``
  with the same ``[gate_r; up_r]`` stride as the weight). The input is gathered over the
  sequence under SP (backward: this rank's slice of an already-summed gradient), and ``A x``
  enters ``B`` through megatron's copy-to-TP region (backward: all-reduce), so ``A``'s
  gradient is complete on every rank.
* row-parallel base (``linear_proj``, ``linear_fc2``; input features split): ``A`` holds this
  rank's input columns, ``A x`` is summed over TP (reduce-scattered over the sequence under
  SP), ``B`` is whole on every rank; under SP each rank sees its own tokens, so ``B`` is tagged
  ``sequence_parallel`` and megatron's ``finalize_model_grads`` sums its gradient over TP.

Initial ``A`` is drawn whole from a seed of its own (the layer's global index and the linear's
name) and then cut, so every TP / PP layout starts from the same adapters. Dropout draws from
the default generator where every TP rank holds the same tensor, from megatron's
model-parallel RNG tracker where each holds its own part.

DoRA (``lora.dora``; Liu et al. 2024, PEFT's ``use_dora``) splits each adapted weight into a
direction and a learned magnitude ``m`` per output row:

    y = m / ||W + s B A||_row * (W x + s B A x) + bias          # s = alpha / rank

with the norm detached from the gradient as the paper suggests and PEFT does, and ``m``
starting at ``||W||_row`` so that training starts from the backbone's function. The norm of a
row-parallel weight's rows spans every TP rank's columns: each rank's squared sums are
all-reduced (no gradient flows through them). ``m`` is split like ``B``'s rows for a
column-parallel base, whole (and summed over TP under SP, as ``B``) for a row-parallel one.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor

from casa_megatron.config.schema import LoRAConfig
from casa_megatron.model.init_seed import derived_seed

COLUMN, ROW = "column", "row"
# target -> (the module holding it, its parallel kind)
TARGETS = {
    "linear_qkv": ("self_attention", COLUMN),
    "linear_proj": ("self_attention", ROW),
    "linear_fc1": ("mlp", COLUMN),
    "linear_fc2": ("mlp", ROW),
}
SUFFIX = "_lora"
LORA_MARK = SUFFIX + ".lora_"  # in every adapter tensor's state-dict and checkpoint key
MAGNITUDE = LORA_MARK + "magnitude"  # DoRA's m: ends its keys


class LoRAAdapter(MegatronModule):
    """``(alpha / rank) * B(A(dropout(x)))`` beside one tensor-parallel linear, with DoRA's
    magnitude where ``lora.dora`` (module docstring)."""

    def __init__(self, config: TransformerConfig, kind: str, in_features: int, out_features: int,
                 lora: LoRAConfig, seed: int, gated: bool = False, real_in: Optional[int] = None):
        """``real_in``: the input features past it are padding units that are always zero (an
        encoder MLP's ``fc2``): ``A``'s columns there start at zero, get zero gradients and so stay
        zero, and neither the merged weight nor DoRA's row norms see them, as in the HF model,
        which has no such units."""
        super().__init__(config=config)
        self.kind, self.rank, self.scale, self.gated = kind, lora.rank, lora.scale, gated
        self.dropout, self.dora = lora.dropout, lora.dora
        self.sequence_parallel = config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # A whole: uniform(+-1/sqrt(in)), as torch's Linear and PEFT's kaiming_uniform(a=sqrt(5))
        g = torch.Generator().manual_seed(seed)
        bound = in_features ** -0.5
        a_full = (torch.rand(self.rank, in_features, generator=g) * 2 - 1) * bound  # [r, in]
        if real_in is not None:
            a_full[:, real_in:] = 0
        dtype = config.params_dtype
        if kind == COLUMN:
            a, b_shape = a_full, (out_features // tp, self.rank)
        else:
            a, b_shape = a_full.chunk(tp, dim=1)[tp_rank], (out_features, self.rank)
        self.lora_a = torch.nn.Parameter(a.to(dtype).contiguous())  # [r, in] | [r, in / tp]
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype))  # [out / tp, r] | [out, r]
        if kind == COLUMN:
            tensor_parallel.set_tensor_model_parallel_attributes(self.lora_b, True, 0, 2 if gated else 1)
        else:
            tensor_parallel.set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)
            self.lora_b.sequence_parallel = self.sequence_parallel  # its grad is summed over TP
        if self.dora:  # set from the base weight by init_magnitude (attach_lora, and after a load)
            self.lora_magnitude = torch.nn.Parameter(torch.zeros(b_shape[0], dtype=dtype))  # [out / tp] | [out]
            if kind == COLUMN:
                tensor_parallel.set_tensor_model_parallel_attributes(self.lora_magnitude, True, 0, 2 if gated else 1)
            else:
                self.lora_magnitude.sequence_parallel = self.sequence_parallel
        self._hook = None

    # --- forward ------------------------------------------------------------------------------
    def _dropout(self, x: Tensor, per_rank: bool) -> Tensor:
        if not (self.training and self.dropout):
            return x
        if per_rank:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, training=True)
        return F.dropout(x, self.dropout, training=True)

    def forward(self, x: Tensor) -> Tensor:
        """The base linear's input -> the delta of its output (same layout as the base output)."""
        if self.kind == COLUMN:  # x: [s(/tp), b, in]
            x = self._dropout(x, per_rank=self.sequence_parallel)
            if self.sequence_parallel:
                x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            a = tensor_parallel.copy_to_tensor_model_parallel_region(F.linear(x, self.lora_a))  # [s, b, r]
            return F.linear(a, self.lora_b) * self.scale  # [s, b, out / tp]
        # row: x [s, b, in / tp]
        a = F.linear(self._dropout(x, per_rank=True), self.lora_a)  # [s, b, r], partial over TP
        if self.sequence_parallel:
            a = tensor_parallel.reduce_scatter_to_sequence_parallel_region(a)  # [s / tp, b, r]
        else:
            a = tensor_parallel.reduce_from_tensor_model_parallel_region(a)
        return F.linear(a, self.lora_b) * self.scale  # [s(/tp), b, out]

    def attach(self, base: torch.nn.Module) -> None:
        """Add this adapter's output to ``base``'s (megatron linears return ``(output, bias)``)."""

        def hook(module, args, output):
            out, bias = output
            delta = self(args[0]).to(out.dtype)
            if not self.dora:
                return out + delta, bias
            factor = self.magnitude_factor(module.weight).to(out.dtype)  # [out(/tp)]
            added = getattr(module, "bias", None) if bias is None else None  # a bias already in ``out``
            if added is None or not added.numel():
                return factor * (out + delta), bias
            # factor * (W x + delta) + bias, exact where factor = 1 (B = 0 at the start)
            return factor * (out + delta) + (1 - factor) * added, bias

        self._hook = base.register_forward_hook(hook)

    # --- DoRA -------------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W + s B A||`` of each output row of the whole weight, this rank's rows ([out(/tp)],
        fp32, no gradient): a row-parallel weight's squared sums are all-reduced over TP."""
        sq = (weight.float() + self.delta_weight()).square().sum(dim=1)
        if self.kind == ROW and parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        return sq.sqrt()

    def magnitude_factor(self, weight: Tensor) -> Tensor:
        """``m / ||W + s B A||`` per output row (a zero row, e.g. an encoder MLP's padding unit, keeps m)."""
        norm = self.weight_norm(weight)
        return self.lora_magnitude.float() / torch.where(norm > 0, norm, torch.ones_like(norm))

    @torch.no_grad()
    def init_magnitude(self, weight: Tensor) -> None:
        """``m = ||W + s B A||``: the adapted linear computes ``W x + s B A x``, as without DoRA
        (``B = 0`` at the start: the backbone's function). Collective over TP for a row base."""
        self.lora_magnitude.copy_(self.weight_norm(weight).to(self.lora_magnitude.dtype))

    # --- merge and checkpoint ---------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scale * B A`` in this rank's layout of the base weight ([out(/tp), in(/tp)], fp32)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        axis = {"lora_b": 0, "lora_magnitude": 0} if self.kind == COLUMN else {"lora_a": 1}
        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)
        if self.gated:  # B's rows (and m) follow fc1's [gate; up] layout: saved as fc1's weight is
            for name in ("lora_b", "lora_magnitude") if self.dora else ("lora_b",):
                key = f"{prefix}{name}"
                sharded[key] = apply_swiglu_sharded_factory(
                    sharded[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return sharded


def _linear_features(base: torch.nn.Module, kind: str, tp: int) -> Tuple[int, int]:
    """(in, out) features of the whole (TP=1) linear, from its local weight."""
    out_local, in_local = base.weight.shape
    return (in_local, out_local * tp) if kind == COLUMN else (in_local * tp, out_local)


def attach_lora(layers, layer_offset: int, lora: LoRAConfig, config: TransformerConfig,
                seed: int, prefix: str = "lm.layers", real_ffn: Optional[int] = None) -> List[LoRAAdapter]:
    """Give each targeted linear of the adapted layers (LM layers or encoder blocks; global index
    ``layer_offset + i``) its adapter; returns them. Layers without the module
    (a ``replace`` CASA layer has no self-attention) are skipped. ``real_ffn``: the MLP's width
    before zero-unit padding (``model.vision.ffn_pad_multiple``), for ``fc2``'s adapter."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    adapters = []
    for i, layer in enumerate(layers):
        index = layer_offset + i
        for target in (t for t in lora.targets if lora.adapts(t, index)):
            holder_name, kind = TARGETS[target]
            holder = getattr(layer, holder_name, None)
            base = getattr(holder, target, None) if holder is not None else None
            if base is None:
                continue
            d_in, d_out = _linear_features(base, kind, tp)
            gated = target == "linear_fc1" and config.gated_linear_unit
            real_in = real_ffn if target == "linear_fc2" and real_ffn is not None and real_ffn < d_in else None
            adapter = LoRAAdapter(config, kind, d_in, d_out, lora,
                                  derived_seed(seed, f"{prefix}.{index}.{holder_name}.{target}.lora"), gated, real_in)
            holder.add_module(target + SUFFIX, adapter)
            adapter.attach(base)
            if adapter.dora:
                adapter.init_magnitude(base.weight)
            adapters.append(adapter)
    return adapters


def lora_adapters(model: torch.nn.Module) -> Iterator[Tuple[str, LoRAAdapter]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            yield name, module


def init_magnitudes(model: torch.nn.Module, keys=None) -> int:
    """Set DoRA magnitudes from their base weights (``init_magnitude``): all of them, or those
    whose state-dict key is in ``keys`` (after a load that did not hold them). Every TP rank calls
    it with the same keys (row-parallel norms are all-reduced). Returns how many were set."""
    count = 0
    for name, adapter in lora_adapters(model):
        if adapter.dora and (keys is None or f"{name}.lora_magnitude" in keys):
            holder_name, _, attr = name.rpartition(".")
            adapter.init_magnitude(getattr(model.get_submodule(holder_name), attr[: -len(SUFFIX)]).weight)
            count += 1
    return count


@torch.no_grad()
def remove_lora(model: torch.nn.Module, merge: bool) -> int:
    """Remove every adapter and its hook; with ``merge`` fold it into its base weight first
    (``W += scale * B A``; DoRA: ``W = m / ||W + s B A|| * (W + s B A)``, the bias unchanged; at
    any TP layout), so the model computes the same function without them (what ``export-hf``
    writes). Returns the number removed."""
    removed = 0
    for name, adapter in list(lora_adapters(model)):
        holder_name, _, attr = name.rpartition(".")
        holder = model.get_submodule(holder_name)
        if merge:
            base = getattr(holder, attr[: -len(SUFFIX)])
            merged = base.weight.float() + adapter.delta_weight()
            if adapter.dora:
                merged *= adapter.magnitude_factor(base.weight)[:, None]
            base.weight.copy_(merged.to(base.weight.dtype))
        adapter._hook.remove()
        delattr(holder, attr)
        removed += 1
    return removed


def merge_lora(model: torch.nn.Module) -> int:
    return remove_lora(model, merge=True)


def base_weight_name(adapter_name: str) -> str:
    """``...self_attention.linear_qkv_lora`` -> ``...self_attention.linear_qkv.weight``."""
    return adapter_name[: -len(SUFFIX)] + ".weight"

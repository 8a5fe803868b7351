"""The generation cache of a CASA model: text in self-attention, one window in each CASA layer.

* Self-attention layers cache the K/V of **text tokens only** (for the insertion baseline the
  stream also holds image tokens: that is the baseline's cost, measured beside CASA).
* Each CASA / cross-attention layer keeps the K/V of its **current window**: the window's image
  tokens and the window's text so far. When the next image opens a window, both are dropped and
  the new image's K/V take their place. Images never enter the self-attention cache.

So CASA's memory grows by ``2 * kv_heads * head_dim * bytes`` per text token and self-attention
layer, and stays bounded by one window per CASA layer. K/V buffers grow by doubling, so appending
one token is O(1) amortised instead of re-copying the whole history (flat per-token latency).

One :class:`RowCache` per batch row: rows open windows at different places (and may be padded
differently), so each row is run on its own (``CasaCache.rows``).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from transformers.cache_utils import Cache


class GrowingKV:
    """K/V ``[kv_heads, length, head_dim]`` in a buffer that grows by doubling."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """k, v [kv_heads, n, d] -> the whole cached K/V [kv_heads, length + n, d] (views).

        Under autograd (fine-tuning: a forward with ``labels`` over several windows runs them one
        after another through this cache) the K/V grow by concatenation instead: attention saved
        the earlier views for its backward, and writing the next piece into the same buffer would
        change them (``RuntimeError: ... modified by an inplace operation``)."""
        n = k.shape[1]
        need = self.length + n
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            if self.length:
                k = torch.cat([self.k[:, :self.length], k], 1)
                v = torch.cat([self.v[:, :self.length], v], 1)
            self.k, self.v, self.length = k, v, need
            return k, v
        if self.k is None or need > self.k.shape[1]:
            capacity = max(need, 2 * (self.k.shape[1] if self.k is not None else 0), 16)
            new_k = k.new_empty(k.shape[0], capacity, k.shape[2])
            new_v = v.new_empty(v.shape[0], capacity, v.shape[2])
            if self.length:
                new_k[:, :self.length] = self.k[:, :self.length]
                new_v[:, :self.length] = self.v[:, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, self.length:need] = k
        self.v[:, self.length:need] = v
        self.length = need
        return self.k[:, :need], self.v[:, :need]

    def truncate(self, length: int) -> None:
        """Back to the first ``length`` tokens (activation checkpointing's recomputation)."""
        if length < self.length:
            self.k, self.v, self.length = self.k[:, :length], self.v[:, :length], length

    def clone(self) -> "GrowingKV":
        """An independent copy (appends to one never show in the other)."""
        other = GrowingKV()
        if self.k is not None:
            other.k, other.v = self.k.clone(), self.v.clone()
        other.length = self.length
        return other

    def view(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.k is None:
            return None, None
        return self.k[:, :self.length], self.v[:, :self.length]

    def nbytes(self) -> int:
        """Bytes of the cached tokens (the allocated buffer may be up to 2x that)."""
        if self.k is None:
            return 0
        return 2 * self.length * self.k.shape[0] * self.k.shape[2] * self.k.element_size()

    def allocated_bytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()


class WindowKV:
    """One CASA layer's current window: image K/V (fixed once the window opens) + window text."""

    def __init__(self):
        self.image_k: Optional[torch.Tensor] = None  # [kv_heads, n_img, d]
        self.image_v: Optional[torch.Tensor] = None
        self.text = GrowingKV()

    def open(self, image_k: Optional[torch.Tensor], image_v: Optional[torch.Tensor]) -> None:
        """A new window: the previous window's images and text are dropped."""
        self.image_k, self.image_v = image_k, image_v
        self.text = GrowingKV()

    def clone(self) -> "WindowKV":
        """Image K/V are shared (never written after the window opens); the window text is copied."""
        other = WindowKV()
        other.image_k, other.image_v, other.text = self.image_k, self.image_v, self.text.clone()
        return other

    @property
    def num_image_tokens(self) -> int:
        return 0 if self.image_k is None else int(self.image_k.shape[1])

    def nbytes(self) -> int:
        img = 0 if self.image_k is None else 2 * self.image_k.numel() * self.image_k.element_size()
        return img + self.text.nbytes()


class RowCache:
    """Everything one batch row remembers between forward calls."""

    def __init__(self, num_layers: int, fusion_layers: List[int]):
        self.self_attn: Dict[int, GrowingKV] = {i: GrowingKV() for i in range(num_layers)}
        self.windows: Dict[int, WindowKV] = {i: WindowKV() for i in fusion_layers}
        self.text_tokens = 0  # text tokens seen (= the next text position)
        self.stream_tokens = 0  # tokens in the self-attention stream (text + inserted images)
        self.window_start = 0  # text position of the current window's first token
        self.window_images = 0  # images in the current window
        self.windows_opened = 0
        self.last_token_was_image = False
        # chat-template layout: images whose placeholders ended a call; they open a window at the
        # next call's first token (a template with no markup after its placeholder, streaming)
        self.pending_images: List[torch.Tensor] = []

    def mark(self, layer: int):
        """Where layer ``layer``'s caches stand now, for :meth:`rewind`."""
        window = self.windows.get(layer)
        return (self.self_attn[layer].length,
                None if window is None else (window.image_k, window.image_v, window.text, window.text.length))

    def rewind(self, layer: int, mark) -> None:
        """Layer ``layer``'s caches as :meth:`mark` found them. Activation checkpointing recomputes a
        layer in backward, after the row's later pieces appended to its caches (and may have opened
        another window): the recomputation must see what the first pass saw. Under autograd the
        caches grow by concatenation, so the earlier tensors are intact and this only slices."""
        sa_length, window_mark = mark
        self.self_attn[layer].truncate(sa_length)
        if window_mark is not None:
            window = self.windows[layer]
            window.image_k, window.image_v, window.text, text_length = window_mark
            window.text.truncate(text_length)

    def clone(self) -> "RowCache":
        other = copy.copy(self)  # the counters
        other.self_attn = {i: kv.clone() for i, kv in self.self_attn.items()}
        other.windows = {i: w.clone() for i, w in self.windows.items()}
        other.pending_images = list(self.pending_images)
        return other

    def nbytes(self) -> Dict[str, int]:
        return {"self_attention": sum(kv.nbytes() for kv in self.self_attn.values()),
                "casa_windows": sum(w.nbytes() for w in self.windows.values())}


class CasaCache(Cache):
    """A transformers ``Cache`` so ``generate()`` carries it between steps; the per-row state
    lives in :class:`RowCache` objects created on first use."""

    def __init__(self, num_layers: int, fusion_layers: List[int]):
        super().__init__(layers=[])
        self.num_layers, self.fusion_layers = num_layers, list(fusion_layers)
        self.rows: List[RowCache] = []
        self.columns = 0  # input columns consumed (pads included): what generate() slices against

    def row(self, r: int) -> RowCache:
        while len(self.rows) <= r:
            self.rows.append(RowCache(self.num_layers, self.fusion_layers))
        return self.rows[r]

    # --- batch reshuffles of generate(): beam search, num_return_sequences, assisted decoding ---
    def _take(self, indices) -> None:
        """Row j becomes old row ``indices[j]``. A row taken once moves; taken again, it is cloned
        (beams that share a history must not share buffers they append to)."""
        indices = [int(x) for x in indices]
        if indices:
            self.row(max(indices))  # rows never run yet (all padding so far) exist, empty
        old, taken, rows = self.rows, set(), []
        for i in indices:
            rows.append(old[i].clone() if i in taken else old[i])
            taken.add(i)
        self.rows = rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take([r for r in range(len(self.rows)) for _ in range(repeats)])

    def crop(self, max_length: int) -> None:
        """Assisted / speculative decoding rolls the cache back to ``max_length`` columns. Not
        supported: rolling back across a window opening would need the closed window's K/V, which
        this cache drops by design. An explicit error, never the base class's silent no-op."""
        raise NotImplementedError("CasaCache cannot be cropped: assisted / speculative decoding (assistant_model, "
                                  "prompt_lookup_num_tokens) is not supported by CASA models; use greedy, "
                                  "sampling or beam search")

    def reset(self) -> None:
        self.rows, self.columns = [], 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed (text tokens, pads included): what ``generate()`` compares
        ``input_ids`` against."""
        return self.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers

    def nbytes(self) -> Dict[str, int]:
        total = {"self_attention": 0, "casa_windows": 0}
        for row in self.rows:
            for key, value in row.nbytes().items():
                total[key] += value
        return total

    def __repr__(self) -> str:
        return f"CasaCache(rows={len(self.rows)}, bytes={self.nbytes()})"

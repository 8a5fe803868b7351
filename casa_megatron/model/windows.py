"""CASA window bookkeeping: which text queries see which image and text keys.

A CASA attention layer never puts image tokens into the text stream. Instead
each text query attends, in one softmax, to the image tokens of its *window*
followed by the window's text up to itself. A window starts where images are
inserted (images inserted at the same position share a window) and at the
start of every row, and runs until the next window start.

Everything downstream (attention kernels, RoPE on image keys, context
parallel splitting) only needs the varlen description produced here:
``cu_seqlens`` per window plus gather indices that pack keys/values window by
window as ``[images of w, text of w]``. Because the image keys come first, a
causal mask aligned to the *bottom right* of each window's score matrix is
exactly "images + text at positions <= query", so flash-attn varlen or
Transformer Engine ``thd`` kernels can run CASA without a custom mask.

All construction is vectorised with torch (no per-token or per-window Python
loops) so it can run on the GPU every step; the only host syncs are the
validation checks and the ``max_seqlen`` integers that the kernels need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "WindowLayout",
    "build_windows",
    "placements_from_placeholders",
    "segment_starts_from_cu_seqlens",
]


@dataclass
class WindowLayout:
    """Bookkeeping for CASA windows over a flattened batch.

    Text tokens are flattened row-major from ``[b, s]`` into ``t = b*s`` tokens
    (token index = ``row*s + pos``). Windows are contiguous runs of that
    flattened text order. KV packing order per window: its image tokens, then
    its text tokens.

    ``kv_index`` indexes ``torch.cat([text_flat, image_flat])`` (text rows
    first, ``b*s`` of them, then the ``num_image_tokens`` image rows) and yields
    the packed causal-CASA KV sequence; ``image_kv_index`` indexes
    ``image_flat`` alone and yields the packed cross-attention KV sequence
    (segmented by ``cu_seqlens_image``). Because images are required in stream
    order, ``image_kv_index`` is the identity permutation; it is kept so that
    callers never rely on that implementation detail.
    """

    cu_seqlens_q: torch.Tensor  # [W+1] int32 cumulative text tokens per window
    cu_seqlens_kv: torch.Tensor  # [W+1] int32 cumulative (image + text) tokens per window
    cu_seqlens_image: torch.Tensor  # [W+1] int32 cumulative image tokens per window
    max_seqlen_q: int
    max_seqlen_kv: int
    max_seqlen_image: int
    kv_index: torch.Tensor  # [total_kv] int64 into cat([text_flat, image_flat])
    image_kv_index: torch.Tensor  # [num_image_tokens] int64 into image_flat
    image_key_positions: torch.Tensor  # [num_image_tokens] int64 position id of insertion point
    window_has_image: torch.Tensor  # [W] bool
    num_text_tokens: int
    num_image_tokens: int
    batch_size: int
    seq_length: int

    @property
    def num_windows(self) -> int:
        return int(self.cu_seqlens_q.numel()) - 1

    def to(self, device: Union[str, torch.device]) -> "WindowLayout":
        """Move every tensor field to ``device`` (ints are left as they are)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def _as_long_1d(x: Union[torch.Tensor, Sequence[int]], name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.numel() == 0:  # an empty Python list becomes float32; accept it as "no images"
        return t.reshape(0).to(torch.long)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one entry per image), got shape {tuple(t.shape)}")
    if t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.to(torch.long)


def _validate_images(
    batch_size: int,
    seq_length: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    num_tokens: torch.Tensor,
    image_embedding_counts: Optional[torch.Tensor],
    num_image_embeddings: Optional[int],
) -> None:
    """Raise ValueError naming the first offending image; images are given in stream order."""
    n_img = rows.numel()
    if positions.numel() != n_img or num_tokens.numel() != n_img:
        raise ValueError(
            "image_rows, image_positions and image_num_tokens must have one entry per image, "
            f"got {n_img}, {positions.numel()} and {num_tokens.numel()} entries"
        )
    bad = ((rows < 0) | (rows >= batch_size) | (positions < 0) | (positions >= seq_length)).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(
            f"window overruns the sequence: image {k} is placed at (row {int(rows[k])}, "
            f"position {int(positions[k])}) but the batch is [{batch_size}, {seq_length}]"
        )
    bad = (num_tokens <= 0).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(
            f"image_num_tokens must be positive: image {k} contributes {int(num_tokens[k])} tokens"
        )
    if n_img > 1:
        key = rows * seq_length + positions  # flat stream position of each image
        bad = (key[1:] < key[:-1]).nonzero()
        if bad.numel():
            k = int(bad[0]) + 1
            raise ValueError(
                "images are not in stream order (sorted by (row, position)): image "
                f"{k} at ({int(rows[k])}, {int(positions[k])}) comes after image {k - 1} at "
                f"({int(rows[k - 1])}, {int(positions[k - 1])}); the image embeddings are "
                "consumed in stream order"
            )
    if image_embedding_counts is not None:
        if image_embedding_counts.numel() != n_img:
            raise ValueError(
                f"image_embedding_counts has {image_embedding_counts.numel()} entries but there "
                f"are {n_img} images"
            )
        bad = (image_embedding_counts != num_tokens).nonzero()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(
                f"image embedding count mismatch for image {k}: the text reserves "
                f"{int(num_tokens[k])} tokens but the vision encoder produced "
                f"{int(image_embedding_counts[k])} embeddings"
            )
    if num_image_embeddings is not None:
        expected = int(num_tokens.sum())
        if int(num_image_embeddings) != expected:
            raise ValueError(
                f"image embedding count mismatch: the images reserve {expected} tokens in total "
                f"(sum of image_num_tokens) but the vision encoder produced "
                f"{int(num_image_embeddings)} embeddings"
            )


def build_windows(
    batch_size: int,
    seq_length: int,
    image_rows: torch.Tensor,
    image_positions: torch.Tensor,
    image_num_tokens: torch.Tensor,
    window_starts: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    num_image_embeddings: Optional[int] = None,
    *,
    image_embedding_counts: Optional[torch.Tensor] = None,
) -> WindowLayout:
    """Build the CASA window layout for a ``[batch_size, seq_length]`` text batch.

    Args:
        image_rows: [n_img] batch row of each image.
        image_positions: [n_img] text position the image is inserted *before*;
            its window starts there. Images must be in stream order, i.e.
            sorted by ``(row, position)``; their embeddings are concatenated
            in that order (``image_flat``).
        image_num_tokens: [n_img] embedding tokens each image contributes.
        window_starts: optional [b, s] bool of explicit window starts (sample
            boundaries of packed sequences, QA turns, video frames). It is
            authoritative: each image must sit on a marked start. If None,
            windows start at row starts and image insertion positions.
        position_ids: optional [b, s] position ids (default ``arange(s)`` per
            row); gives the RoPE position of image keys (their insertion point).
        num_image_embeddings: optional total rows produced by the vision
            encoder; must equal ``image_num_tokens.sum()``.
        image_embedding_counts: optional [n_img] rows the encoder produced per
            image; must equal ``image_num_tokens`` image by image.

    Position 0 of every row always starts a window (text-only if no image is
    inserted there), so windows never cross rows.

    Returns:
        WindowLayout on the device of ``image_rows``.
    """
    b, s = int(batch_size), int(seq_length)
    if b <= 0 or s <= 0:
        raise ValueError(f"batch_size and seq_length must be positive, got [{b}, {s}]")
    device = torch.as_tensor(image_rows).device
    rows = _as_long_1d(image_rows, "image_rows", device)
    positions = _as_long_1d(image_positions, "image_positions", device)
    num_tokens = _as_long_1d(image_num_tokens, "image_num_tokens", device)
    counts = None
    if image_embedding_counts is not None:
        counts = _as_long_1d(image_embedding_counts, "image_embedding_counts", device)
    _validate_images(b, s, rows, positions, num_tokens, counts, num_image_embeddings)

    t = b * s
    img_flat = rows * s + positions  # [n_img] flat text index of each insertion point

    # --- window starts over the flattened text -------------------------------
    starts = torch.zeros(t, dtype=torch.bool, device=device)  # [t]
    if window_starts is not None:
        ws = torch.as_tensor(window_starts, device=device)
        if tuple(ws.shape) != (b, s):
            raise ValueError(
                f"window_starts must have shape [batch, seq] = [{b}, {s}], got {tuple(ws.shape)}"
            )
        starts |= ws.reshape(t).to(torch.bool)
        starts[::s] = True
        bad = (~starts[img_flat]).nonzero()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(
                f"image {k} at ({int(rows[k])}, {int(positions[k])}) does not start its window: "
                "window_starts is authoritative and must mark every image insertion position"
            )
    else:
        starts[::s] = True
        starts[img_flat] = True

    # Windows and images are both sorted in stream order, so every per-window
    # count is a difference of sorted boundaries (searchsorted / nonzero): no
    # scatter-adds, hence deterministic on the GPU as well.
    window_id = torch.cumsum(starts.to(torch.long), 0) - 1  # [t] window of each text token
    start_idx = starts.nonzero().squeeze(1)  # [W] flat index where each window starts
    num_windows = start_idx.numel()
    cu_q = torch.cat([start_idx, start_idx.new_tensor([t])]).to(torch.int32)  # [W+1]
    text_per_window = (cu_q[1:] - cu_q[:-1]).to(torch.long)  # [W]

    # --- images per window -----------------------------------------------------
    img_window = window_id[img_flat]  # [n_img], non-decreasing
    tokens_before_image = torch.cat([num_tokens.new_zeros(1), torch.cumsum(num_tokens, 0)])  # [n_img+1]
    first_image = torch.searchsorted(img_window, torch.arange(num_windows + 1, device=device))  # [W+1]
    cu_image = tokens_before_image[first_image].to(torch.int32)  # [W+1]
    image_per_window = (cu_image[1:] - cu_image[:-1]).to(torch.long)  # [W]
    n_image_tokens = int(tokens_before_image[-1])
    cu_kv = cu_q + cu_image  # [W+1]

    # --- packed KV gather index ------------------------------------------------
    # Window w occupies kv slots [cu_kv[w], cu_kv[w+1]): images first, then text.
    # Text token i of window w lands at cu_kv[w] + image_per_window[w] + (i - cu_q[w])
    # = i + cu_image[w+1]; image token j lands at cu_kv[w] + (j - cu_image[w])
    # = j + cu_q[w]. Both are contiguous because images are in stream order.
    cu_image_l = cu_image.to(torch.long)
    cu_q_l = cu_q.to(torch.long)
    text_idx = torch.arange(t, device=device)  # [t]
    img_tok_idx = torch.arange(n_image_tokens, device=device)  # [n_image_tokens]
    img_tok_window = torch.repeat_interleave(img_window, num_tokens)  # [n_image_tokens]
    kv_index = torch.empty(t + n_image_tokens, dtype=torch.long, device=device)  # [total_kv]
    kv_index[text_idx + cu_image_l[window_id + 1]] = text_idx
    kv_index[img_tok_idx + cu_q_l[img_tok_window]] = t + img_tok_idx

    if position_ids is None:
        img_pos_ids = positions
    else:
        pid = torch.as_tensor(position_ids, device=device)
        if tuple(pid.shape) != (b, s):
            raise ValueError(
                f"position_ids must have shape [batch, seq] = [{b}, {s}], got {tuple(pid.shape)}"
            )
        img_pos_ids = pid.reshape(t).to(torch.long)[img_flat]
    image_key_positions = torch.repeat_interleave(img_pos_ids, num_tokens)  # [n_image_tokens]

    return WindowLayout(
        cu_seqlens_q=cu_q,
        cu_seqlens_kv=cu_kv,
        cu_seqlens_image=cu_image,
        max_seqlen_q=int(text_per_window.max()),
        max_seqlen_kv=int((text_per_window + image_per_window).max()),
        max_seqlen_image=int(image_per_window.max()),
        kv_index=kv_index,
        image_kv_index=img_tok_idx,
        image_key_positions=image_key_positions,
        window_has_image=image_per_window > 0,
        num_text_tokens=t,
        num_image_tokens=n_image_tokens,
        batch_size=b,
        seq_length=s,
    )


def placements_from_placeholders(
    tokens: torch.Tensor,
    image_token_id: int,
    image_num_tokens: Union[Sequence[int], torch.Tensor],
    *,
    merge_adjacent: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find image placements from placeholder tokens in a ``[b, s]`` token batch.

    The text holds ONE placeholder token per image, which stays in the text as
    the first token of that image's window (the image is inserted just before
    it). Images are matched to placeholders in stream order.

    With ``merge_adjacent=True`` a run of consecutive placeholders in a row is
    treated as images inserted at the same position (the first placeholder of
    the run), so they share one window instead of each later placeholder
    opening its own window.

    Returns:
        (image_rows, image_positions, image_num_tokens), each [n_img] int64 on
        ``tokens.device``, ready for :func:`build_windows`.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    device = tokens.device
    num_tokens = _as_long_1d(image_num_tokens, "image_num_tokens", device)
    is_ph = tokens == image_token_id  # [b, s]
    rows, positions = is_ph.nonzero(as_tuple=True)  # row-major = stream order
    if rows.numel() != num_tokens.numel():
        raise ValueError(
            f"missing image tokens: the text has {rows.numel()} placeholder token(s) "
            f"(id {image_token_id}) but {num_tokens.numel()} image(s) were given"
        )
    if merge_adjacent and rows.numel() > 1:
        # A placeholder continues a run if the previous token in its row is one too.
        prev_is_ph = torch.zeros_like(is_ph)
        prev_is_ph[:, 1:] = is_ph[:, :-1]
        run_start = ~prev_is_ph[rows, positions]  # [n_img]
        run_id = torch.cumsum(run_start.to(torch.long), 0) - 1  # [n_img]
        positions = positions[run_start][run_id]
    return rows.to(torch.long), positions.to(torch.long), num_tokens


def segment_starts_from_cu_seqlens(
    cu_seqlens: torch.Tensor, batch_size: int, seq_length: int
) -> torch.Tensor:
    """Turn packed-sequence boundaries into a ``[b, s]`` window_starts mask.

    ``cu_seqlens`` ([n+1], as in Megatron's PackedSeqParams) holds cumulative
    sample lengths over the flattened ``b*s`` text. Every sample start becomes
    a window start so that CASA never attends across packed samples; row starts
    are always marked as well.
    """
    b, s = int(batch_size), int(seq_length)
    cu = torch.as_tensor(cu_seqlens).to(torch.long).reshape(-1)
    if cu.numel() and (int(cu.min()) < 0 or int(cu.max()) > b * s):
        raise ValueError(
            f"cu_seqlens values must lie in [0, {b * s}] (batch {b} x seq {s}), got range "
            f"[{int(cu.min())}, {int(cu.max())}]"
        )
    starts = torch.zeros(b * s, dtype=torch.bool, device=cu.device)  # [t]
    inner = cu[cu < b * s]
    starts[inner] = True
    starts[::s] = True
    return starts.view(b, s)

"""The token-insertion baseline (LLaVA style): image tokens are put *into* the text stream.

It shares everything with :class:`CASAVLM` except the fusion: same embedding, vision encoder,
projector, output layer and LM layers (all plain megatron layers: ``fusion_layers()`` is empty
for ``insertion``), the same :class:`VLMBatch` input and the same output contract (per-token
loss ``[b, s]`` or TP-sharded logits ``[s, b, v/tp]`` over the *text* positions). Parameter
names are CASAVLM's, so one backbone checkpoint loads into every fusion and comparisons are fair.

Combined stream. Each row becomes ``s + si`` tokens (``si`` = ``image_seq_length``): the
projected tokens of every image are placed just before the text token they are inserted at,
in stream order; the row is padded at the end to exactly ``s + si`` so megatron's pipeline
shapes are static. Padding attends only to padding and is never read back.

Masks. Block-causal over packed samples (``sample_starts``): an image belongs to the sample of
its insertion position and is a causal member of it (it sees its sample's earlier text and
images, later text sees it), nothing crosses samples.

Positions (``model.fusion.image_position_scheme``). ``insertion``: RoPE positions count image
tokens too, LLaVA style: inside a sample the combined tokens get consecutive positions starting
at the sample's first text position, so the text after an image of ``n`` tokens is shifted by
``n`` (HF LLaVA / megatron's ``llava_model`` for 1D RoPE backbones). ``mrope`` (default with the
Qwen2.5-VL encoder): Qwen2.5-VL's multimodal positions as transformers' ``get_rope_index``
builds them, computed from the batch structure (``model/mrope.py``).

Pipeline. The first stage (the encoder's last one when it spans several) builds the combined
stream; every LM stage sends
``[s + si (/tp under sequence parallelism), b, h]``; the last stage gathers the text positions
back before the output layer. The layout is pure index bookkeeping recomputed per stage from
the batch (no host sync except the per-row capacity check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.fp8_utils import get_fp8_context
from torch import Tensor

from casa_megatron.model.batch import VLMBatch
from casa_megatron.model.mrope import insertion_positions, mrope_freqs
from casa_megatron.model.packed_attention import packed_seq_params, segment_starts
from casa_megatron.model.vision import tokens_per_image
from casa_megatron.model.vlm import CASAVLM


@dataclass
class InsertionLayout:
    """Where every text and image token sits in the combined ``[b, L]`` stream (``L = s + si``).

    Flat indices are row-major over ``[b, L]`` (``row * L + column``).
    """

    text_index: Tensor  # [b*s] flat combined index of text token (row, pos) (row-major)
    image_index: Tensor  # [n_tok] flat combined index of each image token (stream order)
    source_index: Tensor  # [b*L] into cat([text [b*s], image tokens [n_tok], zero row [1]])
    position_ids: Tensor  # [b, L] RoPE positions (LLaVA-style consecutive within a sample)
    segment_ids: Tensor  # [b, L] packed sample of each slot; -1 for padding
    length: int  # L

    def attention_mask(self) -> Tensor:
        """[b, 1, L, L] bool, True = masked: causal inside a sample, nothing across samples."""
        seg = self.segment_ids
        pos = torch.arange(self.length, device=seg.device)
        allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
        return (~allowed)[:, None]


def build_insertion_layout(batch_size: int, seq_length: int, image_seq_length: int,
                           image_rows: Tensor, image_positions: Tensor, image_num_tokens: Tensor,
                           position_ids: Tensor, sample_starts: Optional[Tensor]) -> InsertionLayout:
    """Vectorised layout of the combined stream; images must be in stream order.

    A text token at ``(r, p)`` lands at column ``p + (#image tokens of row r inserted at <= p)``;
    image token ``j`` of row ``r`` (``j``-th in the row's stream order, inserted before ``p``)
    lands at column ``p + j``. Both are searchsorted counts over the sorted image-token keys
    ``r * s + p``, so nothing loops over tokens or images in Python.
    """
    b, s, si = int(batch_size), int(seq_length), int(image_seq_length)
    length = s + si
    device = position_ids.device
    rows, positions = image_rows.long().to(device), image_positions.long().to(device)
    counts = image_num_tokens.long().to(device)
    _check_images(b, s, rows, positions)
    n_tok = int(counts.sum())

    tok_image = torch.repeat_interleave(torch.arange(rows.numel(), device=device), counts)  # [n_tok]
    tok_row, tok_pos = rows[tok_image], positions[tok_image]  # [n_tok]
    tok_key = tok_row * s + tok_pos  # [n_tok] sorted: flat text index each token precedes
    per_row = torch.bincount(tok_row, minlength=b)  # [b]
    if n_tok and int(per_row.max()) > si:
        r = int(per_row.argmax())
        raise ValueError(f"row {r} has {int(per_row[r])} image tokens but insertion pads every row to "
                         f"seq_length + image_seq_length: only image_seq_length={si} image slots per row")
    row_first = torch.cumsum(per_row, 0) - per_row  # [b] first image token of each row
    rank_in_row = torch.arange(n_tok, device=device) - row_first[tok_row]  # [n_tok]

    text_key = torch.arange(b * s, device=device)  # [b*s] = r*s + p
    text_row = text_key // s
    # image tokens of the row inserted at positions <= p
    n_le = torch.searchsorted(tok_key, text_key, right=True) - row_first[text_row]  # [b*s]
    text_index = text_key + text_row * si + n_le  # r*L + p + n_le
    image_index = tok_row * length + tok_pos + rank_in_row  # [n_tok]

    # Packed samples: segment ids and, per text token, the first position of its sample.
    if sample_starts is None:
        starts = torch.zeros(b, s, dtype=torch.bool, device=device)
    else:
        starts = sample_starts.bool().to(device).clone()
    starts[:, 0] = True
    seg = torch.cumsum(starts.long(), dim=1) - 1  # [b, s]
    col = torch.arange(s, device=device).expand(b, s)
    sample_first = torch.cummax(torch.where(starts, col, torch.zeros_like(col)), dim=1).values  # [b, s]
    start_key = (text_row.view(b, s) * s + sample_first).reshape(-1)  # [b*s]
    # image tokens of the row that belong to earlier samples
    n_before = torch.searchsorted(tok_key, start_key, right=False) - row_first[text_row]  # [b*s]

    pos_flat = position_ids.long().reshape(-1)  # [b*s]
    text_pos = pos_flat + n_le - n_before  # [b*s]
    image_pos = pos_flat[tok_key] + rank_in_row - n_before[tok_key]  # [n_tok]

    total = b * length
    combined_pos = torch.zeros(total, dtype=torch.long, device=device)
    combined_pos[text_index], combined_pos[image_index] = text_pos, image_pos
    combined_seg = torch.full((total,), -1, dtype=torch.long, device=device)
    seg_flat = seg.reshape(-1)
    combined_seg[text_index], combined_seg[image_index] = seg_flat, seg_flat[tok_key]
    source = torch.full((total,), b * s + n_tok, dtype=torch.long, device=device)  # zero row
    source[text_index] = text_key
    source[image_index] = b * s + torch.arange(n_tok, device=device)
    return InsertionLayout(text_index=text_index, image_index=image_index, source_index=source,
                           position_ids=combined_pos.view(b, length),
                           segment_ids=combined_seg.view(b, length), length=length)


def _check_images(b: int, s: int, rows: Tensor, positions: Tensor) -> None:
    if rows.numel() != positions.numel():
        raise ValueError(f"image_rows has {rows.numel()} entries but image_positions {positions.numel()}")
    if rows.numel() == 0:
        return
    if int(rows.min()) < 0 or int(rows.max()) >= b or int(positions.min()) < 0 or int(positions.max()) >= s:
        raise ValueError(f"an image is placed outside the [{b}, {s}] batch (window overruns the sequence)")
    key = rows * s + positions
    if bool((key[1:] < key[:-1]).any()):
        raise ValueError("images are not in stream order (sorted by (row, position)); the image "
                         "embeddings are consumed in that order")


class InsertionVLM(CASAVLM):
    """Token insertion over the same modules as :class:`CASAVLM` (built with no fusion layers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.casa_layers():
            raise ValueError("InsertionVLM needs model.fusion.mechanism='insertion' (no CASA layers)")

    def layout(self, batch: VLMBatch) -> InsertionLayout:
        b, s = batch.shape
        counts = tokens_per_image(batch.image_grid_thw, self.model_config.vision.spatial_merge_size)
        return build_insertion_layout(b, s, self.image_seq_length, batch.image_rows,
                                      batch.image_positions, counts, batch.position_ids,
                                      batch.sample_starts)

    def stream_rotary(self, batch: VLMBatch, layout: InsertionLayout) -> Tensor:
        """RoPE phases of the combined stream [L, b, 1, d]: consecutive 1-D positions (scheme
        ``insertion``, LLaVA) or Qwen2.5-VL's multimodal positions (``mrope``)."""
        if self.image_position_scheme != "mrope":
            return self.rotary.text_freqs(layout.position_ids)
        positions = self.mrope_positions(batch, layout)  # [3, b, L]
        freqs = mrope_freqs(self.rotary, positions, self.model_config.lm.resolved_mrope_section)  # [b, L, 1, d]
        return freqs.transpose(0, 1).contiguous()

    def mrope_positions(self, batch: VLMBatch, layout: InsertionLayout) -> Tensor:
        """[3, b, L]: transformers' get_rope_index over the combined stream, from its structure."""
        b, s = batch.shape
        return insertion_positions(batch.image_grid_thw, batch.image_rows, batch.image_positions,
                                   batch.position_ids, batch.sample_starts, layout.text_index,
                                   layout.image_index, layout.length,
                                   self.model_config.vision.spatial_merge_size, self.temporal_steps(batch))

    def _combined_stream(self, batch: VLMBatch, layout: InsertionLayout) -> Tensor:
        """Text embeddings + projected images -> combined stream [L(/tp), b, h]."""
        b, s = batch.shape
        text, images = self.text_and_image_tokens(batch)  # [s(/tp), b, h], [n_tok, h]
        if self.sequence_parallel:
            # The embedding scatters under SP; interleaving needs the whole row. Every rank then
            # holds the same full stream, so the backward only splits (output_grad=False).
            text = tensor_parallel.gather_from_sequence_parallel_region(
                text, tensor_parallel_output_grad=False)  # [s, b, h]
        images = images.to(text.dtype)
        h = text.shape[-1]
        source = torch.cat([text.transpose(0, 1).reshape(b * s, h), images, text.new_zeros(1, h)])
        combined = source[layout.source_index].view(b, layout.length, h).transpose(0, 1).contiguous()
        if self.sequence_parallel:
            combined = tensor_parallel.scatter_to_sequence_parallel_region(combined)  # [L/tp, b, h]
        return combined  # [L(/tp), b, h]

    def _text_positions(self, hidden: Tensor, layout: InsertionLayout, b: int, s: int) -> Tensor:
        """Combined [L(/tp), b, h] -> text positions [s(/tp), b, h] for the output layer."""
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)  # [L, b, h], identical on every rank
        h = hidden.shape[-1]
        flat = hidden.transpose(0, 1).reshape(b * layout.length, h)  # [b*L, h]
        text = flat[layout.text_index].view(b, s, h).transpose(0, 1).contiguous()  # [s, b, h]
        if self.sequence_parallel:
            text = tensor_parallel.scatter_to_sequence_parallel_region(text)  # [s/tp, b, h]
        return text

    def _decode(self, hidden: Tensor, layout: InsertionLayout, rotary: Tensor) -> Tensor:
        # Only plain megatron layers here, so call them directly (no VisionContext needed);
        # FP8 autocast as in CASADecoder (a null context unless config.fp8 is set).
        # Packed samples: cu_seqlens over the combined stream (padding is its own segment), or
        # the dense block-causal mask on the reference path.
        if self.model_config.packed_attention:
            mask, packed = None, packed_seq_params(segment_starts(layout.segment_ids))
        else:
            mask, packed = layout.attention_mask(), None

        def call(layer, h: Tensor) -> Tensor:
            return layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rotary, packed_seq_params=packed)[0]

        with get_fp8_context(self.config):
            hidden = self.decoder.run_layers(hidden, call)  # recomputed as model.recompute says
        if self.decoder.final_layernorm is not None:
            hidden = self.decoder.final_layernorm(hidden)
        return hidden

    def forward(self, batch: VLMBatch) -> Tensor:
        """Encoder-only stages: ``encoder_payload``. First/middle LM stages: [L(/tp), b, h]. Last
        stage: per-token loss [b, s] on the text with labels, else TP-sharded text logits [s, b, v/tp]."""
        b, s = batch.shape
        if self.encoder_only:  # the encoder spans several stages and this one holds no LM layer
            return self.encoder_payload(*self.text_and_encoder(batch)[:2])
        layout = self.layout(batch)
        hidden = self._combined_stream(batch, layout) if self.lm_first else self.input_tensor
        rotary = self.stream_rotary(batch, layout)  # [L, b, 1, d]
        hidden = self._decode(hidden, layout, rotary)  # [L(/tp), b, h]
        if not self.post_process:
            return hidden
        logits = self.output_logits(self._text_positions(hidden, layout, b, s))  # [s, b, v/tp]
        if batch.labels is None:
            return logits
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), batch.labels.transpose(0, 1).contiguous())  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]

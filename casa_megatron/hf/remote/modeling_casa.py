"""``CasaForCausalLM``: the exported CASA vision-language model as transformers remote code.

It reproduces casa_megatron's math exactly (same norms, RoPE, windows, placements, gates and
insertion baseline), under the Hugging Face names of the backbone family (``model.*``,
``lm_head``), ``model.layers.{i}.casa_attn.*`` / ``casa_layernorm`` for fusion modules and
``visual.*`` for the vision tower.

Inputs: ``input_ids`` with one placeholder per image (``image_token_id``, or ``video_token_id``
for the frames / temporal clips of a video), ``pixel_values`` (all images' patches, stream
order), ``image_grid_thw`` ``[n_img, 3]`` and, for videos, ``second_per_grid_ts`` ``[n_img]``
(seconds per temporal patch, 0 for still images: the ``mrope`` temporal step). A run of
adjacent placeholders is one group of images sharing a window; the window lasts until the next
group; text before the first image is a text-only window. Where the group goes depends on the
text layout the model was trained with (``placeholders_in_stream``):

* ``True`` (our layout tokens ``<bos> <image> question <answer> ...``): the placeholders are
  text tokens; the images are inserted before the first one, which is the window's first query.
* ``False`` (the tokenizer's chat template, ``<|vision_start|><|image_pad|><|vision_end|>``):
  the placeholders are removed from the text stream and the images are inserted before the
  token that follows the run (exactly the training pipeline's ``data/chat_template.py``); the
  removed positions get zero hidden states. The processor puts the placeholders of images that
  share a window next to each other.

Rows are run one at a time (each opens windows at its own places); padded positions
(``attention_mask`` 0, left padding for batched generation) are skipped, so a padded row computes
exactly what it computes alone (pads get zero hidden states). Within a row, the new tokens
are cut at window starts and each piece goes through all layers before the next, appending to
the row's :class:`~.cache_casa.RowCache`; a fresh cache gives full recomputation, a kept one
gives cached generation through the very same code.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_casa import CasaCache, RowCache
from .configuration_casa import CasaConfig
from .layers_casa import CasaAttention, CasaRMSNorm, DecoderLayer, Rotary
from .vision_casa import build_vision, encode_images

# transformers >= 5.24 names the output's cache ``cache`` (the old name still works, with a warning)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def temporal_steps(config: CasaConfig, n: int, second_per_grid_ts: Optional[torch.Tensor]) -> List[float]:
    """Temporal position step between two temporal patches of each image: a video clip
    (``second_per_grid_ts > 0``) steps by ``tokens_per_second * seconds`` as in transformers'
    Qwen2.5-VL, a still image by 1 (it has one temporal patch anyway); casa_megatron's
    ``model/mrope.temporal_steps``."""
    if second_per_grid_ts is None:
        return [1.0] * n
    seconds = torch.as_tensor(second_per_grid_ts).detach().double().reshape(-1).cpu().tolist()
    if len(seconds) != n:
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n} images (one per image_grid_thw "
                         "row, 0 for still images)")
    per_second = float(config.vision_config.get("tokens_per_second", 2.0))
    return [per_second * s if s > 0 else 1.0 for s in seconds]


def image_key_positions(config: CasaConfig, window_start: int, grids: List[List[int]], device,
                        steps: Optional[List[float]] = None) -> Optional[torch.Tensor]:
    """RoPE positions of a window's image keys, or None (unrotated). ``grids``: the window's
    images' ``[t, h, w]`` patch grids, in order; ``steps``: their temporal steps (default 1).

    ``insertion``: every image key at the text position of its window start ([n]); the query-key
    phase then depends only on the distance from the window start, as for text keys.
    ``none``: unrotated. ``mrope`` ([3, n]): Qwen2.5-VL multimodal positions relative to the
    window, ``window start + (t * step, row, column)`` in merged tokens, the images of one window
    following each other in time (each starts one after the previous one's last temporal
    position), so frame order and layout become visible -- casa_megatron's
    ``model/mrope.casa_image_positions``.
    """
    merge = config.vision_config.get("spatial_merge_size", 2)
    counts = [t * h * w // (merge * merge) for t, h, w in grids]
    scheme = config.image_position_scheme
    if scheme == "none":
        return None
    if scheme == "insertion":
        return torch.full((sum(counts),), window_start, dtype=torch.long, device=device)
    steps = steps if steps is not None else [1.0] * len(grids)
    out, t_next = [], 0
    for (t, h, w), step in zip(grids, steps):
        times = (torch.arange(t, dtype=torch.float64) * step).long()  # as transformers: floor(t * step)
        tt, hh, ww = torch.meshgrid(times, torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
        offsets = torch.stack([tt.flatten() + t_next, hh.flatten(), ww.flatten()])  # [3, t*h*w/merge^2]
        t_next = int(offsets[0].max()) + 1
        out.append(offsets + window_start)
    return torch.cat(out, dim=1).to(device)


class CasaPreTrainedModel(PreTrainedModel):
    config_class = CasaConfig
    config: CasaConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """Our own :class:`CasaCache` is made in ``forward``; never a DynamicCache."""
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CasaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, CasaAttention) and module.gate is not None:
            init.zeros_(module.gate)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        elif isinstance(module, Rotary):
            init.copy_(module.inv_freq, Rotary.frequencies(module.config)[0])


class CasaTextModel(CasaPreTrainedModel):
    """The LM backbone with its fusion modules (``model.*``)."""

    def __init__(self, config: CasaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = CasaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.gradient_checkpointing = False  # set by transformers' (gradient|activation)_checkpointing_enable()
        self.post_init()

    def run(self, x: torch.Tensor, positions: torch.Tensor, row: RowCache,
            window_images: Optional[torch.Tensor] = None, open_window: bool = False,
            image_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [n, h] embeddings of one row's new tokens (one window piece) -> hidden [n, h]."""
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        image_cos_sin = None
        if image_positions is not None and image_positions.dim() == 2:  # mrope: [3, n]
            image_cos_sin = self.rotary.cos_sin_multimodal(image_positions, self.config.resolved_mrope_section, x.dtype)
        elif image_positions is not None:
            image_cos_sin = self.rotary.cos_sin(image_positions, x.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if open_window and layer.fused:
                layer.open_window(window_images, self.rotary, image_cos_sin, row.windows[layer.index])
            if checkpointing:
                x = self._checkpointed(layer, x, cos_sin, row)
            else:
                x = layer(x, self.rotary, cos_sin, row)
        return x

    def _checkpointed(self, layer, x: torch.Tensor, cos_sin, row: RowCache) -> torch.Tensor:
        """The layer's activations recomputed in backward instead of kept. Always non-reentrant,
        whatever ``use_reentrant`` was asked: a later window piece reads this piece's K/V from the
        cache, not from the checkpointed function's inputs, and only the non-reentrant form keeps
        that path in the graph (a reentrant first pass runs without grad). The recomputation
        rewinds the layer's caches to what the first pass saw (``RowCache.rewind``)."""
        from torch.utils.checkpoint import checkpoint

        mark = row.mark(layer.index)

        def run_layer(h):
            row.rewind(layer.index, mark)
            return layer(h, self.rotary, cos_sin, row)

        return checkpoint(run_layer, x, use_reentrant=False)


class CasaForCausalLM(CasaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CasaConfig):
        super().__init__(config)
        self.model = CasaTextModel(config)
        self.visual = build_vision(config.vision_config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # --- images ---------------------------------------------------------------------------
    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> List[int]:
        merge = self.config.vision_config.get("spatial_merge_size", 2)
        return (image_grid_thw.prod(-1) // (merge * merge)).tolist()

    def image_embeddings(self, pixel_values, image_grid_thw, second_per_grid_ts=None) -> List[torch.Tensor]:
        """All images -> one tensor [tokens, h] per image (stream order); each carries its
        ``[t, h, w]`` grid as ``.grid`` and its temporal step as ``.step`` (mrope positions)."""
        if pixel_values is None:
            return []
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grid = torch.as_tensor(image_grid_thw).to(pixel_values.device).long()
        tokens = encode_images(self.visual, pixel_values, grid).to(self.lm_head.weight.dtype)
        per_image = list(torch.split(tokens, self.tokens_per_image(grid)))
        steps = temporal_steps(self.config, len(per_image), second_per_grid_ts)
        for emb, g, step in zip(per_image, grid.tolist(), steps):
            emb.grid, emb.step = g, step
        return per_image

    # --- one row ----------------------------------------------------------------------------
    def _placeholder_ids(self) -> List[int]:
        return [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]

    def _row_layout(self, ids: torch.Tensor, row: RowCache, has_images: bool
                    ) -> Tuple[torch.Tensor, Dict[int, int], int]:
        """A row's new tokens -> (indices of the tokens that enter the text stream, {index in the
        text stream: number of images inserted before it}, images left pending at the end).
        See the module docstring."""
        is_img = torch.isin(ids, torch.tensor(self._placeholder_ids(), device=ids.device)) if has_images \
            else torch.zeros_like(ids, dtype=torch.bool)
        flags = is_img.tolist()
        runs, k = [], 0  # (first index, length) of every run of placeholders
        while k < len(flags):
            if flags[k]:
                j = k
                while j < len(flags) and flags[j]:
                    j += 1
                runs.append((k, j - k))
                k = j
            else:
                k += 1
        if self.config.placeholders_in_stream:
            if runs and runs[0][0] == 0 and row.last_token_was_image:
                raise ValueError("a run of image placeholders continues across forward calls; give all "
                                 "images of one window in the same call")
            return torch.arange(len(flags), device=ids.device), {a: n for a, n in runs}, 0
        keep = (~is_img).nonzero().flatten()
        opens: Dict[int, int] = {}
        pending = 0
        for a, n in runs:
            at = a - sum(m for b, m in runs if b < a)  # index of the next kept token
            if at == keep.shape[0]:  # the call ends with placeholders: they open the next call's window
                pending = n
            else:
                opens[at] = n
        if row.pending_images and keep.shape[0]:
            opens[0] = opens.get(0, 0) + len(row.pending_images)
        return keep, opens, pending

    @staticmethod
    def _window_pieces(n: int, opens: Dict[int, int], row: RowCache) -> List[Tuple[int, int, int]]:
        """Cut a row's ``n`` new text tokens at window starts: [(start, end, images opening it)],
        -1 for a piece that continues the current window."""
        starts = sorted(opens)
        continuing = False
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
            continuing = row.text_tokens > 0  # else: the leading text-only window opens here
        pieces = []
        for j, a in enumerate(starts):
            b = starts[j + 1] if j + 1 < len(starts) else n
            pieces.append((a, b, -1 if (j == 0 and continuing) else opens.get(a, 0)))
        return pieces

    def _casa_row(self, ids: torch.Tensor, opens: Dict[int, int], images: List[torch.Tensor],
                  row: RowCache) -> torch.Tensor:
        embeds = self.model.embed_tokens(ids)  # [n, h]
        out, used = [], 0
        for a, b, n_img in self._window_pieces(len(ids), opens, row):
            positions = torch.arange(row.text_tokens, row.text_tokens + b - a, device=ids.device)
            window_images = image_pos = None
            if n_img >= 0:  # this piece opens a window
                row.window_start, row.window_images, row.windows_opened = row.text_tokens, n_img, row.windows_opened + 1
                if n_img:
                    group = images[used:used + n_img]
                    used += n_img
                    window_images = torch.cat(group)  # [m, h]
                    image_pos = image_key_positions(self.config, row.window_start, [im.grid for im in group],
                                                    ids.device, [im.step for im in group])
            out.append(self.model.run(embeds[a:b], positions, row, window_images, n_img >= 0, image_pos))
            row.text_tokens += b - a
        return torch.cat(out)

    def _insertion_row(self, ids: torch.Tensor, opens: Dict[int, int], images: List[torch.Tensor],
                       row: RowCache) -> torch.Tensor:
        """Token insertion: each group's image tokens go into the stream before the token that
        opens its window; positions count every stream token (LLaVA style, as casa_megatron's
        InsertionVLM)."""
        embeds = self.model.embed_tokens(ids)  # [n, h]
        parts, text_index, used, length = [], [], 0, 0
        for a, b, n_img in self._window_pieces(len(ids), opens, row):
            if n_img > 0:
                block = torch.cat(images[used:used + n_img])
                used += n_img
                parts.append(block)
                length += block.shape[0]
            parts.append(embeds[a:b])
            text_index.extend(range(length, length + b - a))
            length += b - a
        stream = torch.cat(parts)  # [L, h]
        positions = torch.arange(row.stream_tokens, row.stream_tokens + length, device=ids.device)
        hidden = self.model.run(stream, positions, row)
        row.stream_tokens += length
        row.text_tokens += ids.shape[0]
        return hidden[torch.tensor(text_index, device=ids.device)]

    def _row(self, ids: torch.Tensor, images: List[torch.Tensor], row: RowCache) -> torch.Tensor:
        """One row's new (unpadded) tokens [n] -> hidden [n, h]. A removed placeholder gets the
        hidden state of the last text token before it (zeros if there is none in this call), so
        the logits at any position predict the next text token."""
        keep, opens, pending = self._row_layout(ids, row, bool(images))
        # removed-placeholder layout: images whose placeholders end the call wait for the next token
        held, images = images[len(images) - pending:] if pending else [], images[:len(images) - pending]
        if keep.shape[0] == 0:
            row.pending_images = row.pending_images + held
            return self.model.embed_tokens.weight.new_zeros(ids.shape[0], self.config.hidden_size)
        images, row.pending_images = row.pending_images + images, held  # earlier ones open at token 0
        run = self._insertion_row if self.config.fusion_mechanism == "insertion" else self._casa_row
        hidden = run(ids[keep], opens, images, row)
        row.last_token_was_image = bool(images) and bool(torch.isin(ids[-1:], torch.tensor(
            self._placeholder_ids(), device=ids.device)).any())
        if keep.shape[0] == ids.shape[0]:
            return hidden
        source = torch.cumsum((~torch.isin(ids, torch.tensor(self._placeholder_ids(), device=ids.device))).long(),
                              0) - 1  # [n]: index in ``hidden`` of the last kept token at or before each one
        out = torch.cat([hidden.new_zeros(1, hidden.shape[-1]), hidden])[source + 1]
        return out

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        second_per_grid_ts: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[CasaCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        cache: Optional[CasaCache] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [b, s] (the new tokens of each row) -> logits [b, s, vocab].

        The cache comes as ``cache`` (transformers >= 5.24's ``generate`` renamed
        ``past_key_values`` to ``cache``: a forward that took only the old name saw no cache at
        every step and generated from the new token alone) or as ``past_key_values`` (older
        versions, and our own callers); the output carries it under the name the installed
        transformers reads."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("got both `cache` and `past_key_values`: pass the CasaCache once")
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError("CasaForCausalLM needs input_ids (image placeholders mark the images)")
        b, s = input_ids.shape
        # Padding (left or anywhere): a row runs on its real tokens only, so a padded row gives
        # exactly what it gives alone. ``attention_mask`` may span the whole history (generate).
        keep = torch.ones(b, s, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask[:, -s:].bool()
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, CasaCache):
            raise TypeError(f"past_key_values must be a CasaCache, got {type(past_key_values).__name__}")
        cache = past_key_values if past_key_values is not None else self.new_cache()
        images = self.image_embeddings(pixel_values, image_grid_thw, second_per_grid_ts)
        is_ph = torch.isin(input_ids, torch.tensor(self._placeholder_ids(), device=input_ids.device))
        ph = (is_ph & keep).sum(1).tolist()
        if images and sum(ph) != len(images):
            raise ValueError(f"missing image tokens: the text has {sum(ph)} image placeholder(s) "
                             f"(ids {self._placeholder_ids()}) but {len(images)} image(s) were given")
        hidden, used = [], 0
        for r in range(b):
            row_images = images[used:used + ph[r]] if images else []
            used += len(row_images)
            out = self.model.embed_tokens.weight.new_zeros(s, self.config.hidden_size)  # pads stay 0
            if bool(keep[r].any()):
                out[keep[r]] = self._row(input_ids[r][keep[r]], row_images, cache.row(r))
            hidden.append(out)
        cache.columns += s
        hidden = self.model.norm(torch.stack(hidden))  # [b, s, h]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [b, s, v]
        loss = None
        if labels is not None:
            # transformers' causal-LM loss: shifted, -100 ignored, and summed / ``num_items_in_batch``
            # when the Trainer passes it (gradient accumulation: the Trainer then no longer divides
            # by the accumulation steps, because this forward takes **kwargs)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    # --- generate(): rows repeated for beams / num_return_sequences --------------------------
    _PER_IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "second_per_grid_ts")

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Optional[torch.LongTensor] = None, **model_kwargs):
        """transformers repeats every tensor along dim 0 (``repeat_interleave``), right for
        ``[b, ...]`` tensors but not for the image inputs, which hold all rows' images in row order
        (``pixel_values [patches, C*T*p*p]``, one grid / step per image): interleaving them would
        mix patches of different images. Each row's images are repeated with the row instead."""
        images = {k: model_kwargs.pop(k) for k in self._PER_IMAGE_INPUTS if model_kwargs.get(k) is not None}
        if expand_size > 1 and input_ids is not None and "pixel_values" in images:
            images = self._repeat_row_images(input_ids, model_kwargs.get("attention_mask"), images, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        model_kwargs.update(images)
        return input_ids, model_kwargs

    def _repeat_row_images(self, input_ids, attention_mask, images: Dict[str, torch.Tensor], repeats: int):
        """Image inputs of rows [r0, r1, ...] -> of rows [r0 x repeats, r1 x repeats, ...]."""
        is_ph = torch.isin(input_ids, torch.tensor(self._placeholder_ids(), device=input_ids.device))
        if attention_mask is not None:
            is_ph &= attention_mask[:, -input_ids.shape[1]:].bool()
        per_row = is_ph.sum(1).tolist()  # images of each row (one placeholder each)
        grid = torch.as_tensor(images["image_grid_thw"]).long()
        if sum(per_row) != grid.shape[0]:
            raise ValueError(f"the prompt has {sum(per_row)} image placeholder(s) but {grid.shape[0]} image(s) "
                             "were given")
        first = [0]
        for n in per_row:
            first.append(first[-1] + n)
        order = [i for r, n in enumerate(per_row) for _ in range(repeats) for i in range(first[r], first[r] + n)]
        patch_start = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()  # pixel rows per image
        pixels = images["pixel_values"]
        out = dict(images)
        out["pixel_values"] = torch.cat([pixels[patch_start[i]:patch_start[i + 1]] for i in order]) if order \
            else pixels[:0]
        index = torch.tensor(order, dtype=torch.long, device=grid.device)
        out["image_grid_thw"] = images["image_grid_thw"][index.to(images["image_grid_thw"].device)]
        if "second_per_grid_ts" in images:
            steps = torch.as_tensor(images["second_per_grid_ts"])
            out["second_per_grid_ts"] = steps[index.to(steps.device)]
        return out

    def new_cache(self) -> CasaCache:
        return CasaCache(self.config.num_hidden_layers, self.config.fusion_layers)


__all__ = ["CasaForCausalLM", "CasaTextModel", "CasaPreTrainedModel"]

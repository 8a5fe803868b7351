"""``CasaForCausalLM``: the exported CASA vision-language model as transformers remote code.

It reproduces casa_megatron's math exactly (same norms, RoPE, windows, placements, gates and
insertion baseline), under the Hugging Face names of the backbone family (``model.*``,
``lm_head``), ``model.layers.{i}.casa_attn.*`` / ``casa_layernorm`` for fusion modules and
``visual.*`` for the vision tower.

Inputs: ``input_ids`` with one ``image_token_id`` placeholder per image (the image is inserted
before it; a run of adjacent placeholders shares one window), ``pixel_values`` (all images'
patches, stream order) and ``image_grid_thw`` ``[n_img, 3]``. A window opens at every run of
placeholders and lasts until the next one; text before the first image is a text-only window.

Rows are run one at a time (each opens windows at its own places); padded positions
(``attention_mask`` 0, left padding for batched generation) are skipped, so a padded row computes
exactly what it computes alone (pads get zero hidden states). Within a row, the new tokens
are cut at window starts and each piece goes through all layers before the next, appending to
the row's :class:`~.cache_casa.RowCache`; a fresh cache gives full recomputation, a kept one
gives cached generation through the very same code.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_casa import CasaCache, RowCache
from .configuration_casa import CasaConfig
from .layers_casa import CasaAttention, CasaRMSNorm, DecoderLayer, Rotary
from .vision_casa import build_vision, encode_images


def image_key_positions(config: CasaConfig, window_start: int, grids: List[List[int]],
                        device) -> Optional[torch.Tensor]:
    """RoPE positions of a window's image keys, or None (unrotated). ``grids``: the window's
    images' ``[t, h, w]`` patch grids, in order.

    ``insertion``: every image key at the text position of its window start ([n]); the query-key
    phase then depends only on the distance from the window start, as for text keys.
    ``none``: unrotated. ``mrope`` ([3, n]): Qwen2.5-VL multimodal positions relative to the
    window, ``window start + (t, row, column)`` in merged tokens, the images of one window following
    each other in time (frame order and layout become visible) -- casa_megatron's
    ``model/mrope.casa_image_positions`` for still images (temporal step 1).
    """
    merge = config.vision_config.get("spatial_merge_size", 2)
    counts = [t * h * w // (merge * merge) for t, h, w in grids]
    scheme = config.image_position_scheme
    if scheme == "none":
        return None
    if scheme == "insertion":
        return torch.full((sum(counts),), window_start, dtype=torch.long, device=device)
    out, t_next = [], 0
    for t, h, w in grids:
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
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
        for layer in self.layers:
            if open_window and layer.fused:
                layer.open_window(window_images, self.rotary, image_cos_sin, row.windows[layer.index])
            x = layer(x, self.rotary, cos_sin, row)
        return x


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

    def image_embeddings(self, pixel_values, image_grid_thw) -> List[torch.Tensor]:
        """All images -> one tensor [tokens, h] per image (stream order); each carries its
        ``[t, h, w]`` grid as ``.grid`` (for mrope image-key positions)."""
        if pixel_values is None:
            return []
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grid = torch.as_tensor(image_grid_thw).to(pixel_values.device).long()
        tokens = encode_images(self.visual, pixel_values, grid).to(self.lm_head.weight.dtype)
        per_image = list(torch.split(tokens, self.tokens_per_image(grid)))
        for emb, g in zip(per_image, grid.tolist()):
            emb.grid = g
        return per_image

    # --- one row ----------------------------------------------------------------------------
    def _window_pieces(self, ids: torch.Tensor, row: RowCache, has_images: bool) -> List[Tuple[int, int, int]]:
        """Cut a row's new tokens at window starts: [(start, end, images opening it)]."""
        is_img = (ids == self.config.image_token_id).tolist() if has_images else [False] * len(ids)
        starts = []
        for k, img in enumerate(is_img):
            prev_img = is_img[k - 1] if k else row.last_token_was_image
            if img and not prev_img:
                starts.append(k)
            elif img and k == 0:
                raise ValueError("a run of image placeholders continues across forward calls; give all "
                                 "images of one window in the same call")
        if row.text_tokens == 0 and (not starts or starts[0] != 0):
            starts.insert(0, 0)  # the leading text-only window
        if not starts or starts[0] != 0:
            starts.insert(0, 0)  # continuation of the current window
            continuing = True
        else:
            continuing = row.text_tokens > 0 and not is_img[0]
        pieces = []
        for j, a in enumerate(starts):
            b = starts[j + 1] if j + 1 < len(starts) else len(ids)
            n_img = 0
            while a + n_img < b and is_img[a + n_img]:
                n_img += 1
            opens = not (j == 0 and continuing)
            pieces.append((a, b, n_img if opens else -1))
        return pieces

    def _casa_row(self, ids: torch.Tensor, images: List[torch.Tensor], row: RowCache) -> torch.Tensor:
        embeds = self.model.embed_tokens(ids)  # [n, h]
        out, used = [], 0
        for a, b, n_img in self._window_pieces(ids, row, bool(images)):
            positions = torch.arange(row.text_tokens, row.text_tokens + b - a, device=ids.device)
            window_images = image_pos = None
            if n_img >= 0:  # this piece opens a window
                row.window_start, row.window_images, row.windows_opened = row.text_tokens, n_img, row.windows_opened + 1
                if n_img:
                    window_images = torch.cat(images[used:used + n_img])  # [m, h]
                    used += n_img
                    grids = [im.grid for im in images[used - n_img:used]]
                    image_pos = image_key_positions(self.config, row.window_start, grids, ids.device)
            out.append(self.model.run(embeds[a:b], positions, row, window_images, n_img >= 0, image_pos))
            row.text_tokens += b - a
        row.last_token_was_image = bool(ids[-1] == self.config.image_token_id) and bool(images)
        return torch.cat(out)

    def _insertion_row(self, ids: torch.Tensor, images: List[torch.Tensor], row: RowCache) -> torch.Tensor:
        """Token insertion: each run's image tokens go into the stream before its first placeholder;
        positions count every stream token (LLaVA style, as casa_megatron's InsertionVLM)."""
        embeds = self.model.embed_tokens(ids)  # [n, h]
        parts, text_index, used, length = [], [], 0, 0
        pieces = self._window_pieces(ids, row, bool(images))
        for a, b, n_img in pieces:
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
        row.last_token_was_image = bool(ids[-1] == self.config.image_token_id) and bool(images)
        return hidden[torch.tensor(text_index, device=ids.device)]

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[CasaCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [b, s] (the new tokens of each row) -> logits [b, s, vocab]."""
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
        images = self.image_embeddings(pixel_values, image_grid_thw)
        ph = ((input_ids == self.config.image_token_id) & keep).sum(1).tolist()
        if images and sum(ph) != len(images):
            raise ValueError(f"missing image tokens: the text has {sum(ph)} image placeholder(s) "
                             f"(id {self.config.image_token_id}) but {len(images)} image(s) were given")
        run_row = self._insertion_row if self.config.fusion_mechanism == "insertion" else self._casa_row
        hidden, used = [], 0
        for r in range(b):
            row_images = images[used:used + ph[r]] if images else []
            used += len(row_images)
            out = self.model.embed_tokens.weight.new_zeros(s, self.config.hidden_size)  # pads stay 0
            if bool(keep[r].any()):
                out[keep[r]] = run_row(input_ids[r][keep[r]], row_images, cache.row(r))
            hidden.append(out)
        cache.columns += s
        hidden = self.model.norm(torch.stack(hidden))  # [b, s, h]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [b, s, v]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def new_cache(self) -> CasaCache:
        return CasaCache(self.config.num_hidden_layers, self.config.fusion_layers)


__all__ = ["CasaForCausalLM", "CasaTextModel", "CasaPreTrainedModel"]

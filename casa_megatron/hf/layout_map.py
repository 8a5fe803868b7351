"""The text layout a model was trained with -> the fields of its exported folder.

The training pipeline lays text out with the tokenizer's chat template or with our layout
tokens (``data.text_layout``, docs/data.md); the exported model and processor must do exactly the
same, so an export writes:

* into ``config.json``: ``image_token_id`` / ``video_token_id`` (the placeholders) and
  ``placeholders_in_stream`` (our ``<image>`` is a text token; a template's ``<|image_pad|>`` is
  removed from the stream);
* into ``processor_config.json``: ``text_layout``, the placeholders, ``merge_consecutive``
  (consecutive images share a window except for token insertion), the pixel budgets, the pixel
  statistics and ``fps`` of the data config, and the chat template itself (``chat_template.jinja``);
* into ``generation_config.json``: ``eos_token_id`` = the layout's end-of-turn token (``<|im_end|>``,
  Helium's ``</s>``, our ``<eot>``) and the tokenizer's eos.

``export_fields(model_cfg, data_cfg)`` returns the three dicts; ``hf/folder.write_hf_folder``
takes them as ``config`` extras (through ``config_map.casa_config_dict(extra=...)``),
``processor`` and ``generation``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

from casa_megatron.config.schema import ModelConfig
from casa_megatron.data.config import DataConfig


@dataclass
class ExportFields:
    config: Dict[str, Any]
    processor: Dict[str, Any]
    generation: Dict[str, Any]


def _ids(tok, names: List[Optional[str]]) -> List[int]:
    out = []
    for name in names:
        if name:
            idx = tok.convert_tokens_to_ids(name)
            if idx is None or idx == tok.unk_token_id:
                raise ValueError(f"the tokenizer has no {name!r} token")
            out.append(int(idx))
    return out


def export_fields(model: ModelConfig, data: DataConfig, tokenizer_path: Optional[str] = None) -> ExportFields:
    """What the folder needs to lay text out as training did (the data config's tokenizer and
    ``text_layout``; ``tokenizer_path`` overrides where the tokenizer is)."""
    from casa_megatron.data.chat_template import ChatTemplateLayout
    from casa_megatron.data.processor import ProcessorSettings, make_layout

    if tokenizer_path:
        data = replace(data, tokenizer_path=str(tokenizer_path))
    # the training pipeline's own settings (and its error when there is no tokenizer)
    layout = make_layout(ProcessorSettings.from_config(data, "cpu", model.fusion.mechanism))
    chat = isinstance(layout, ChatTemplateLayout)
    tok = layout.tokenizer
    if chat:
        image, video, eot = layout.image_placeholder, layout.video_placeholder, layout.info.end_of_turn
    else:
        image, video, eot = data.image_token, None, data.end_of_turn_token
    image_id, = _ids(tok, [image])
    video_ids = _ids(tok, [video])
    stops = _ids(tok, [eot])
    if tok.eos_token_id is not None and tok.eos_token_id not in stops:
        stops.append(int(tok.eos_token_id))
    config = {"image_token_id": image_id, "video_token_id": video_ids[0] if video_ids else None,
              "placeholders_in_stream": not chat}
    processor = dict(text_layout="chat_template" if chat else "layout_tokens", image_token=data.image_token,
                     answer_token=data.answer_token, end_of_turn_token=data.end_of_turn_token,
                     image_placeholder=image if chat else "", video_placeholder=video or "",
                     merge_consecutive=model.fusion.mechanism != "insertion", max_pixels=data.pixel_budget,
                     min_pixels=data.min_pixels, video_max_pixels=data.video_pixel_budget,
                     image_mean=list(data.image_mean), image_std=list(data.image_std), fps=data.fps)
    if chat:
        processor["chat_template"] = tok.chat_template
    generation = {"eos_token_id": stops, "bos_token_id": tok.bos_token_id,
                  "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else layout.pad_id}
    return ExportFields(config, processor, generation)

"""Greedy generation with the exported Hugging Face model, as a transformers user runs it:
``AutoModelForCausalLM`` / ``AutoProcessor`` with ``trust_remote_code``, the processor's
``apply_chat_template(..., add_generation_prompt=True)`` and ``generate()`` with the model's own
text-only cache; captions through the live captioner (``inference/streaming.LiveCaptioner``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from casa_megatron.data.conversation import Message
from casa_megatron.evaluation.items import CaptionItem, QuestionItem


class NotAnHFFolder(ValueError):
    """The path is not an exported model folder."""


def check_hf_folder(path: str | Path) -> Path:
    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise NotAnHFFolder(f"{p} is not a Hugging Face model folder (no config.json); expected a folder written "
                            "by `casa-convert export-hf`")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAnHFFolder(f"{config} is unreadable ({exc})") from None
    if model_type != "casa":
        raise NotAnHFFolder(f"{p}: model_type {model_type!r}, expected 'casa' (a folder written by "
                            "`casa-convert export-hf`)")
    if not (p / "processor_config.json").is_file():
        raise NotAnHFFolder(f"{p} has no processor_config.json (the exported processor)")
    return p


def hf_messages(messages: Sequence[Message], media) -> List[Dict]:
    """Our messages with the decoded media as payloads of their parts."""
    out, j = [], 0
    for m in messages:
        parts = []
        for p in m.content:
            if isinstance(p, str):
                parts.append({"type": "text", "text": p})
                continue
            item = media[j]
            j += 1
            if item.kind == "video":
                parts.append({"type": "video", "video": list(item.frames)})
            else:
                parts.append({"type": "image", "image": item.frames[0]})
        out.append({"role": m.role, "content": parts})
    return out


class HFGreedy:
    def __init__(self, model, processor, max_new_tokens: int, stop_ids: Sequence[int], banned_ids: Sequence[int]):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.stop_ids, self.banned = max_new_tokens, list(stop_ids), list(banned_ids)

    @torch.no_grad()
    def answer(self, item: QuestionItem) -> List[int]:
        inputs = self.processor.apply_chat_template(hf_messages(item.messages, item.media), add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.model.device, dtype if k == "pixel_values" else v.dtype) for k, v in inputs.items()}
        n = inputs["input_ids"].shape[1]
        pad = self.processor.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop_ids, suppress_tokens=self.banned or None,
                                  pad_token_id=pad if pad is not None else self.stop_ids[0])
        tokens = out[0, n:].tolist()
        for k, t in enumerate(tokens):  # generate pads after the stop token
            if t in self.stop_ids:
                return tokens[:k + 1]
        return tokens

    def caption(self, item: CaptionItem) -> List[List[int]]:
        from casa_megatron.inference.streaming import LiveCaptioner

        captioner = LiveCaptioner(self.model, self.processor, max_new_tokens=self.max_new_tokens,
                                  prompt=item.prompt, stop_tokens=self.stop_ids)
        return [record.tokens for record in captioner.stream(zip(item.times, item.frames))]


def load_hf(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    from casa_megatron.inference.streaming import load_model

    return load_model(str(check_hf_folder(path)), device, dtype)


__all__ = ["HFGreedy", "check_hf_folder", "hf_messages", "load_hf"]

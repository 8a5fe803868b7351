"""Greedy generation with the exported Hugging Face model, as a transformers user runs it:
``AutoModelForCausalLM`` / ``AutoProcessor`` with ``trust_remote_code``, the processor's
``apply_chat_template(..., add_generation_prompt=True)`` and ``generate()`` with the model's own
text-only cache; captions through the live captioner (``inference/streaming.LiveCaptioner``)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from casa_megatron.data.conversation import Message
from casa_megatron.evaluation.items import CaptionItem, QuestionItem


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

    def answer(self, item: QuestionItem) -> List[int]:
        return self.answer_batch([item])[0]

    @torch.no_grad()
    def answer_batch(self, items: Sequence[QuestionItem]) -> List[List[int]]:
        """Greedy answers of several questions in one left-padded ``generate()`` (each row's tokens
        equal its own run's: tests/hf/test_generation.py, tests/evaluation/test_eval.py)."""
        conversations = [hf_messages(item.messages, item.media) for item in items]
        inputs = self.processor.apply_chat_template(conversations if len(items) > 1 else conversations[0],
                                                    add_generation_prompt=True, tokenize=True, return_dict=True)
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.model.device, dtype if k == "pixel_values" else v.dtype) for k, v in inputs.items()}
        n = inputs["input_ids"].shape[1]
        pad = self.processor.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop_ids, suppress_tokens=self.banned or None,
                                  pad_token_id=pad if pad is not None else self.stop_ids[0])
        answers = []
        for row in out[:, n:].tolist():
            stop = next((k for k, t in enumerate(row) if t in self.stop_ids), None)  # generate pads after it
            answers.append(row if stop is None else row[:stop + 1])
        return answers

    def caption(self, item: CaptionItem) -> List[List[int]]:
        from casa_megatron.inference.streaming import LiveCaptioner

        captioner = LiveCaptioner(self.model, self.processor, max_new_tokens=self.max_new_tokens,
                                  prompt=item.prompt, stop_tokens=self.stop_ids)
        return [record.tokens for record in captioner.stream(zip(item.times, item.frames))]



__all__ = ["HFGreedy", "hf_messages"]

"""Greedy generation with the megatron model (one process, TP=1), by recomputation.

Every step runs the whole sequence again: the prompt laid out by the training pipeline itself
(``ChatTemplateLayout.prompt`` / ``LayoutTokens.prompt``, the layout the model was trained on),
packed by the training ``Packer`` into a one-row ``VLMBatch``, plus the tokens generated so far.
No cache, so nothing here can differ from training's forward; the Hugging Face side uses its
text-only cache, and the two must agree.

Captions follow the live captioner: the stream prompt (the user turn and the assistant header),
then per frame its markup with the frame inserted where the template's placeholder was (the
window opens at the token after it; with no markup after the placeholder, at the first
generated token), then greedy tokens until the end of the turn.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import torch

from casa_megatron.data.chat_template import ChatTemplateLayout
from casa_megatron.data.packing import Packer
from casa_megatron.data.records import ImageItem, TokenizedSample
from casa_megatron.evaluation.items import CaptionItem, QuestionItem


class MegatronGreedy:
    def __init__(self, model, cfg, layout, max_new_tokens: int, stop_ids: Sequence[int], banned_ids: Sequence[int]):
        self.model, self.cfg, self.layout = model, cfg, layout
        self.max_new_tokens, self.stop_ids, self.banned = max_new_tokens, set(stop_ids), list(banned_ids)
        self.chat = isinstance(layout, ChatTemplateLayout)
        self.tok = layout.tokenizer

    @torch.no_grad()
    def next_token(self, sample: TokenizedSample) -> int:
        data = self.cfg.data
        packer = Packer(1, len(sample), max(1, sample.num_image_tokens), self.layout.pad_id, data.image_mean,
                        data.image_std, self.cfg.model.vision.temporal_patch_size, data.fps)
        batch, _ = packer.collate([[sample]])
        batch = replace(batch, labels=None).to(next(self.model.parameters()).device)  # build_vlm: cuda if any
        self.model.image_seq_length = max(1, sample.num_image_tokens)
        logits = self.model(batch)[len(sample) - 1, 0, :self.cfg.model.lm.vocab_size].float()  # [v]
        logits[self.banned] = float("-inf")
        return int(logits.argmax())

    def _generate(self, sample: TokenizedSample, pending: List[ImageItem]) -> List[int]:
        """Append greedy tokens to ``sample`` (in place) until a stop token or the budget;
        ``pending`` images open their window at the first generated token."""
        out: List[int] = []
        while len(out) < self.max_new_tokens:
            token = self.next_token(sample)
            sample.input_ids.append(token)
            sample.labels.append(self.layout.pad_id)
            sample.loss_mask.append(0.0)
            if pending:
                sample.images += pending
                sample.window_starts = sorted(set(sample.window_starts) | {pending[0].position})
                pending = []
            out.append(token)
            if token in self.stop_ids:
                break
        return out

    def answer(self, item: QuestionItem) -> List[int]:
        sample = self.layout.prompt(item.key, item.messages, item.media)
        return self._generate(sample, [])

    def _encode(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def caption(self, item: CaptionItem) -> List[List[int]]:
        """Tokens generated after each frame (the stop token included when reached)."""
        if self.chat:
            ids = self.layout.stream_prefix(item.prompt)
            before, after = self.layout.info.markup.get(self.layout.image_placeholder, ("", ""))
            before, after = self._encode(before), self._encode(after)
        else:
            ids = [self.layout.tok.special.bos]
            before, after = [], [self.layout.tok.special.image]
        sample = TokenizedSample(item.key, ids, [self.layout.pad_id] * len(ids), [0.0] * len(ids), [], [],
                                 kind="video")
        per_frame = []
        for frame in item.frames:
            for t in before:
                sample.input_ids.append(t)
            position = len(sample.input_ids)
            image = ImageItem(position, frame)
            sample.input_ids += after
            sample.labels += [self.layout.pad_id] * (len(before) + len(after))
            sample.loss_mask += [0.0] * (len(before) + len(after))
            pending = []
            if position < len(sample.input_ids):
                sample.images.append(image)
                sample.window_starts = sorted(set(sample.window_starts) | {position})
            else:
                pending = [image]
            per_frame.append(self._generate(sample, pending))
        return per_frame

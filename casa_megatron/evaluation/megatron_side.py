"""Greedy generation with the megatron model, by recomputation: one process, or the ranks of a
tensor- / pipeline-parallel layout (``casa-eval --tensor-parallel N --pipeline-parallel M``
under torchrun, for a model one device does not hold).

Every step runs the whole sequence again: the prompt laid out by the training pipeline itself
(``ChatTemplateLayout.prompt`` / ``LayoutTokens.prompt``, the layout the model was trained on),
packed by the training ``Packer``, plus the tokens generated so far. No cache of text or
attention, so nothing here can differ from training's forward; the Hugging Face side uses its
text-only cache, and the two must agree. What is reused is only the projected image tokens of
the previous forward when its encoder input was the same bit for bit
(``model/image_token_cache.py``): the vision encoder runs once per set of images, not once per
generated token, and the tokens are those of full recomputation.

Several items go together (``answer_batch`` / ``caption_batch``: ``casa-eval --batch-size``,
``eval_generation.batch_size``): one row each, padded after its last token, so that causal
attention within the row's own sample keeps its logits; a row that reached its stop token leaves
the next forward. Each forward is one call for B items instead of B calls (2.8x faster for the
main job's held-out split on the CPU, the same tokens).

Captions follow the live captioner: the stream prompt (the user turn and the assistant header),
then per frame its markup with the frame inserted where the template's placeholder was (the
window opens at the token after it; with no markup after the placeholder, at the first
generated token), then greedy tokens until the end of the turn. Clips in one batch go frame by
frame together.

Across ranks every rank builds the same batch; the last pipeline stage picks each row's last
logits and gathers them over TP (all its TP ranks then hold the same argmax) and sends the tokens
down its pipeline group, so every rank appends the same tokens (``_last_logits``, ``_shared``).
PP runs megatron's forward-only schedule; a rank's model chunks of the interleaved schedule (a
list of modules: the evaluation during training) run its interleaved forward, every chunk
reading the same batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import List, Sequence

import torch

from casa_megatron.data.chat_template import ChatTemplateLayout
from casa_megatron.data.packing import Packer
from casa_megatron.data.records import ImageItem, TokenizedSample
from casa_megatron.evaluation.items import CaptionItem, QuestionItem
from casa_megatron.model.image_token_cache import reused_image_tokens


class MegatronGreedy:
    def __init__(self, model, cfg, layout, max_new_tokens: int, stop_ids: Sequence[int], banned_ids: Sequence[int],
                 reuse_image_tokens: bool = True):
        """``model``: a VLM, or this rank's model chunks (a list) under the interleaved schedule.
        ``reuse_image_tokens``: the encoder runs once per image set, not once per token."""
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.reuse_image_tokens = reuse_image_tokens
        self.model, self.cfg, self.layout = model, cfg, layout
        self.max_new_tokens, self.stop_ids, self.banned = max_new_tokens, set(stop_ids), list(banned_ids)
        self.chat = isinstance(layout, ChatTemplateLayout)
        self.tok = layout.tokenizer

    @torch.no_grad()
    def next_tokens(self, samples: Sequence[TokenizedSample]) -> List[int]:
        """The greedy next token of each sample, all in one forward: one sample per row, each
        row padded after its last token (causal attention and the per-sample masks keep every
        row's logits as in a forward of its own; tests/evaluation/test_batched_greedy.py)."""
        data = self.cfg.data
        # sequence parallelism splits the rows and the image slots over the TP ranks: both padded to
        # a multiple of TP (after the last token: causal attention keeps its logits as they were)
        par = self.cfg.parallel
        unit = par.tensor_model_parallel_size if par.sequence_parallel else 1
        length = _round_up(max(len(s) for s in samples), unit)
        slots = _round_up(max(1, *(s.num_image_tokens for s in samples)), unit)  # per row
        packer = Packer(len(samples), length, slots, self.layout.pad_id, data.image_mean,
                        data.image_std, self.cfg.model.vision.temporal_patch_size, data.fps)
        batch, _ = packer.collate([[s] for s in samples])
        device = next(self.chunks[0].parameters()).device  # build_vlm: cuda if any
        batch = replace(batch, labels=None).to(device)
        for chunk in self.chunks:
            chunk.image_seq_length = slots
        # [b, v_padded] at each row's last token on the last stage, else None
        last = _last_logits(self.chunks, batch, length + slots, [len(s) - 1 for s in samples])
        tokens = None
        if last is not None:
            last = last[:, :self.cfg.model.lm.vocab_size].float()
            last[:, self.banned] = float("-inf")
            tokens = last.argmax(-1).tolist()
        return _shared(tokens, len(samples), device)

    def _generate(self, samples: Sequence[TokenizedSample], pending: Sequence[List[ImageItem]]) -> List[List[int]]:
        """Append greedy tokens to each sample (in place) until its stop token or the budget, the
        samples still going answered together; ``pending[i]``: images of sample i that open their
        window at its first generated token."""
        outs: List[List[int]] = [[] for _ in samples]
        pending = [list(p) for p in pending]
        active = list(range(len(samples)))
        with reused_image_tokens(self.chunks) if self.reuse_image_tokens else nullcontext():
            while active:
                self._step(samples, pending, outs, active)
                active = [i for i in active if outs[i][-1] not in self.stop_ids and len(outs[i]) < self.max_new_tokens]
        return outs

    def _step(self, samples, pending, outs, active) -> None:
        """One greedy token for each active sample, appended to it (with its pending images)."""
        for i, token in zip(active, self.next_tokens([samples[i] for i in active])):
            sample = samples[i]
            sample.input_ids.append(token)
            sample.labels.append(self.layout.pad_id)
            sample.loss_mask.append(0.0)
            if pending[i]:
                sample.images += pending[i]
                sample.window_starts = sorted(set(sample.window_starts) | {pending[i][0].position})
                pending[i] = []
            outs[i].append(token)

    def answer(self, item: QuestionItem) -> List[int]:
        return self.answer_batch([item])[0]

    def answer_batch(self, items: Sequence[QuestionItem]) -> List[List[int]]:
        """Greedy answers of several questions, one row each, generated together."""
        return self._generate([self.layout.prompt(item.key, item.messages, item.media) for item in items],
                              [[] for _ in items])

    def _encode(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def caption(self, item: CaptionItem) -> List[List[int]]:
        """Tokens generated after each frame (the stop token included when reached)."""
        return self.caption_batch([item])[0]

    def caption_batch(self, items: Sequence[CaptionItem]) -> List[List[List[int]]]:
        """Each clip's tokens per frame; the clips go frame by frame together (frame k of every
        clip that has one in one generation), each clip's text carried from frame to frame."""
        if self.chat:
            before, after = self.layout.info.markup.get(self.layout.image_placeholder, ("", ""))
            before, after = self._encode(before), self._encode(after)
        else:
            before, after = [], [self.layout.tok.special.image]
        samples = []
        for item in items:
            ids = self.layout.stream_prefix(item.prompt) if self.chat else [self.layout.tok.special.bos]
            samples.append(TokenizedSample(item.key, ids, [self.layout.pad_id] * len(ids), [0.0] * len(ids), [], [],
                                           kind="video"))
        per_frame: List[List[List[int]]] = [[] for _ in items]
        for k in range(max(len(item.frames) for item in items)):
            going = [i for i, item in enumerate(items) if k < len(item.frames)]
            pending = []
            for i in going:
                sample = samples[i]
                sample.input_ids += before
                position = len(sample.input_ids)
                image = ImageItem(position, items[i].frames[k])
                sample.input_ids += after
                sample.labels += [self.layout.pad_id] * (len(before) + len(after))
                sample.loss_mask += [0.0] * (len(before) + len(after))
                if position < len(sample.input_ids):
                    sample.images.append(image)
                    sample.window_starts = sorted(set(sample.window_starts) | {position})
                    pending.append([])
                else:  # no markup after the placeholder: the window opens at the first generated token
                    pending.append([image])
            for i, tokens in zip(going, self._generate([samples[i] for i in going], pending)):
                per_frame[i].append(tokens)
        return per_frame


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def greedy_for(model, cfg, settings, max_new_tokens: int) -> MegatronGreedy:
    """The runner for ``model`` (a built VLM, ``cfg`` its TrainConfig) with the layout of
    ``settings`` (a ``ProcessorSettings``): it stops at the end of the turn (the template's, or our
    ``<eot>``) or the tokenizer's eos, and never emits a media placeholder."""
    from casa_megatron.data.processor import make_layout

    layout = make_layout(settings)
    tok = layout.tokenizer
    if isinstance(layout, ChatTemplateLayout):
        names, stops = [layout.image_placeholder, layout.video_placeholder], [layout.info.end_of_turn]
    else:
        names, stops = [settings.image_token], [settings.end_of_turn_token]
    stop_ids = [tok.convert_tokens_to_ids(n) for n in stops] + ([tok.eos_token_id] if tok.eos_token_id is not None
                                                               else [])
    banned = [tok.convert_tokens_to_ids(n) for n in names if n]
    return MegatronGreedy(model, cfg, layout, max_new_tokens, stop_ids, banned)


def _last_logits(chunks, batch, seq_length: int, positions: Sequence[int]):
    """Full-vocabulary logits ``[b, v_padded]`` of row r at ``positions[r]`` on the last pipeline
    stage, None on the other stages. Picked before the gather over TP, so that B rows gather B
    vocabulary rows, not B x s. ``chunks``: this rank's model chunks (one without the interleaved
    schedule). ``seq_length``: text + image slots (what stages send each other)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        out = chunks[0](batch)
    else:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from casa_megatron.training.step import data_for_chunks

        # the interleaved schedule takes at least PP micro-batches: the batch that many times, the
        # first output kept
        repeats = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
        outs = get_forward_backward_func()(
            forward_step_func=lambda data, chunk: (chunk(next(data)), None),
            data_iterator=data_for_chunks(iter([batch] * repeats), len(chunks)), model=list(chunks),
            num_microbatches=repeats, seq_length=seq_length, micro_batch_size=batch.input_ids.shape[0],
            forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        out = outs[0]  # [s, b, v_padded / tp]
    rows = torch.arange(out.shape[1], device=out.device)
    picked = out[torch.as_tensor(positions, device=out.device), rows]  # [b, v_padded / tp]
    return tensor_parallel.gather_from_tensor_model_parallel_region(picked.contiguous())


def _shared(tokens, count: int, device) -> List[int]:
    """The last stage's ``count`` tokens on every rank of its pipeline (one process: itself)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tokens
    value = torch.tensor([-1] * count if tokens is None else tokens, dtype=torch.long, device=device)
    dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return value.tolist()

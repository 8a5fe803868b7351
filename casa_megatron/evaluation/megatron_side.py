"""Greedy generation with the megatron model, by recomputation: one process, or the ranks of a
tensor- / pipeline-parallel layout (``casa-eval --tensor-parallel N --pipeline-parallel M``
under torchrun, for a model one device does not hold).

Every step runs the whole sequence again: the prompt laid out by the training pipeline itself
(``ChatTemplateLayout.prompt`` / ``LayoutTokens.prompt``, the layout the model was trained on),
packed by the training ``Packer`` into a one-row ``VLMBatch``, plus the tokens generated so far.
No cache, so nothing here can differ from training's forward; the Hugging Face side uses its
text-only cache, and the two must agree.

Captions follow the live captioner: the stream prompt (the user turn and the assistant header),
then per frame its markup with the frame inserted where the template's placeholder was (the
window opens at the token after it; with no markup after the placeholder, at the first
generated token), then greedy tokens until the end of the turn.

Across ranks every rank builds the same batch; the last pipeline stage gathers the logits over TP
(all its TP ranks then hold the same argmax) and sends the token down its pipeline group, so every
rank appends the same token (``_logits``, ``_shared``). PP runs megatron's forward-only schedule;
a rank's model chunks of the interleaved schedule (a list of modules: the evaluation during
training) run its interleaved forward, every chunk reading the same batch.
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
        """``model``: a VLM, or this rank's model chunks (a list) under the interleaved schedule."""
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model, self.cfg, self.layout = model, cfg, layout
        self.max_new_tokens, self.stop_ids, self.banned = max_new_tokens, set(stop_ids), list(banned_ids)
        self.chat = isinstance(layout, ChatTemplateLayout)
        self.tok = layout.tokenizer

    @torch.no_grad()
    def next_token(self, sample: TokenizedSample) -> int:
        data = self.cfg.data
        # sequence parallelism splits the row and the image slots over the TP ranks: both padded to
        # a multiple of TP (after the last token: causal attention keeps its logits as they were)
        par = self.cfg.parallel
        unit = par.tensor_model_parallel_size if par.sequence_parallel else 1
        length, slots = _round_up(len(sample), unit), _round_up(max(1, sample.num_image_tokens), unit)
        packer = Packer(1, length, slots, self.layout.pad_id, data.image_mean,
                        data.image_std, self.cfg.model.vision.temporal_patch_size, data.fps)
        batch, _ = packer.collate([[sample]])
        device = next(self.chunks[0].parameters()).device  # build_vlm: cuda if any
        batch = replace(batch, labels=None).to(device)
        for chunk in self.chunks:
            chunk.image_seq_length = slots
        logits = _logits(self.chunks, batch, length + slots)  # [s, 1, v_padded] on the last stage, else None
        token = None
        if logits is not None:
            last = logits[len(sample) - 1, 0, :self.cfg.model.lm.vocab_size].float()  # [v]
            last[self.banned] = float("-inf")
            token = int(last.argmax())
        return _shared(token, device)

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


def _logits(chunks, batch, seq_length: int):
    """Full-vocabulary logits ``[s, b, v_padded]`` on the last pipeline stage (gathered over TP),
    None on the other stages. ``chunks``: this rank's model chunks (one without the interleaved
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
        out = outs[0]
    return tensor_parallel.gather_from_tensor_model_parallel_region(out)


def _shared(token, device) -> int:
    """The last stage's token on every rank of its pipeline (one process: itself)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return token
    value = torch.tensor([-1 if token is None else token], dtype=torch.long, device=device)
    dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return int(value.item())

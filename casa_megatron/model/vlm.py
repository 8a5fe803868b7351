"""The CASA vision-language model, one pipeline stage of it.

First stage: text embedding, vision encoder and projector. Every stage: its slice of the LM
decoder. Last stage: final norm, output layer, per-token loss.

Pipeline contract (DESIGN.md §2): the tensor sent between LM stages is
``cat([text hidden [s, b, h], image slots [si, b, h]], dim=0)`` (each part divided by TP when
sequence-parallel). Image embeddings ride along unchanged, so each stage's CASA layers read them
and the gradients of every stage's CASA layers flow back to the projector and encoder.
Image tokens fill the ``si * b`` slots slot-major; unused slots are zero padding.

Encoder over several stages (``parallel.vision_blocks_per_pipeline_stage``, ``vision_blocks``
here): each of the first stages runs its part of the encoder's blocks and sends the text
embeddings and the encoder's activations, flattened into one ``[s(/tp)*b*h + n*hv, 1, 1]``
tensor (their sizes differ per micro-batch, so the schedules exchange shapes first:
``variable_seq_lengths``); the stage holding the encoder's last block finishes it, runs the
projector and the first LM layers. A micro-batch without images carries one blank image
through every part (``VisionEncoder.without_images``).

Embeddings. megatron's :class:`LanguageModule` ties the output layer to the word embeddings
when ``model.lm.tie_word_embeddings`` (Qwen2.5-3B): one weight at PP=1; under PP the last stage
keeps a copy that megatron keeps equal (initial all-reduce, gradients summed over the embedding
group) and checkpoints as the embedding. The vocabulary is padded to
``model.lm.padded_vocab_size`` (divisible by every TP size); padded logits are set to -inf so
they take no probability mass: the loss equals the unpadded model's.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from casa_megatron.config.pipeline_split import stage_offsets
from casa_megatron.config.schema import ModelConfig
from casa_megatron.model import specs
from casa_megatron.model.batch import VLMBatch, block_causal_mask, window_start_marks
from casa_megatron.model.casa_layer import CASATransformerLayer
from casa_megatron.model.decoder import CASADecoder
from casa_megatron.model.init_seed import component_seed
from casa_megatron.model.lora import lora_adapters
from casa_megatron.model.mrope import casa_image_positions, mrope_freqs, temporal_steps
from casa_megatron.model.packed_attention import params_from_sample_starts
from casa_megatron.model.rope import PositionRotary
from casa_megatron.model.token_rows import enable_token_rows
from casa_megatron.model.vision import build_projector, build_vision_encoder, tokens_per_image
from casa_megatron.model.vision.interface import check_patches
from casa_megatron.model.vision_context import VisionContext
from casa_megatron.model.windows import build_windows


class CASAVLM(LanguageModule):
    def __init__(
        self,
        model: ModelConfig,
        lm_config: TransformerConfig,
        vision_config: TransformerConfig,
        projector_config: TransformerConfig,
        image_seq_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        vision_blocks: Optional[List[int]] = None,
        vp_stage: Optional[int] = None,
    ):
        """``vision_blocks``: the encoder's blocks on each pipeline stage
        (``ParallelConfig.stage_vision_blocks``); None: all on the first stage. ``vp_stage``: the
        model chunk of this rank under the interleaved schedule (``model/chunks.py``), else None."""
        super().__init__(config=lm_config)
        self.vp_stage = vp_stage  # read by LanguageModule (tied embeddings) and the schedules
        self.model_config = model
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # read by finalize_model_grads (PP: embedding-group all-reduce of the tied weight)
        self.share_embeddings_and_output_weights = model.lm.tie_word_embeddings
        self.vocab_size, self.padded_vocab_size = model.lm.vocab_size, model.lm.padded_vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.image_seq_length = image_seq_length
        self.use_te = specs.resolve_use_te(model.transformer_impl)
        self.sequence_parallel = lm_config.sequence_parallel
        self.tp = lm_config.tensor_model_parallel_size
        self.input_tensor: Optional[Tensor] = None
        self.image_token_cache = None  # an ImageTokenCache during generation (model/image_token_cache.py)
        if self.sequence_parallel and image_seq_length % self.tp:
            raise ValueError(f"image_seq_length={image_seq_length} must be a multiple of "
                             f"tensor_model_parallel_size={self.tp} with sequence parallelism")

        self.rotary = PositionRotary(lm_config, model.lm.head_dim, model.lm.rotary_base,
                                     model.lm.rope_scaling)
        # every component draws its weights from its own seed: the same full weights at every
        # TP / PP layout and split, the same LM layers in every fusion (model/init_seed.py)
        seed = torch.initial_seed()  # the run's seed (parallel/init.py)
        blocks_here = self._place_encoder(vision_blocks, model.vision.num_layers)
        if pre_process:
            with component_seed(seed, "lm.embedding"):
                self.embedding = LanguageModelEmbedding(
                    lm_config, vocab_size=self.padded_vocab_size,
                    max_sequence_length=model.lm.max_position_embeddings, position_embedding_type="rope",
                )
        if blocks_here is not None:
            self.vision = build_vision_encoder(model.vision, vision_config, self.use_te, model.attention_backend,
                                               blocks=blocks_here, seed=seed)
        if self.lm_first:
            with component_seed(seed, "projector"):
                self.projector = build_projector(model.vision, projector_config, self.use_te)
        layer_specs = specs.lm_layer_specs(model.lm.num_layers, model.fusion, self.use_te,
                                           model.attention_backend, model.packed_attention, model.lora,
                                           model.lm.qk_layernorm)
        self.decoder = CASADecoder(lm_config, layer_specs, specs.final_norm_spec(self.use_te),
                                   post_process=post_process, recompute=model.recompute, seed=seed,
                                   vp_stage=vp_stage)
        if post_process:
            with component_seed(seed, "lm.output_layer"):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    lm_config.hidden_size, self.padded_vocab_size, config=lm_config,
                    init_method=lm_config.init_method, bias=False, skip_bias_add=False,
                    gather_output=False,
                    skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                )
        self.setup_embeddings_and_output_layer()
        self._tag_new_parameters()
        self.apply_freezing()

    def _place_encoder(self, vision_blocks: Optional[List[int]], num_blocks: int) -> Optional[range]:
        """Set this stage's roles; return the global encoder blocks it holds (None: none).

        ``encoder_only``: runs encoder blocks and nothing of the LM. ``lm_first``: finishes the
        encoder, runs the projector and the first LM layers (the first stage unless the encoder
        spans several)."""
        stages = [n for n in (vision_blocks or [num_blocks]) if n]
        self.vision_stages = len(stages)
        if self.vision_stages == 1:
            self.encoder_only, self.lm_first = False, self.pre_process
            return range(num_blocks) if self.pre_process else None
        stage = parallel_state.get_pipeline_model_parallel_rank()
        self.encoder_only, self.lm_first = stage < self.vision_stages - 1, stage == self.vision_stages - 1
        if stage >= self.vision_stages:
            return None
        start = stage_offsets(stages)[stage]
        return range(start, start + stages[stage])

    def _set_attention_backend(self) -> None:
        """No-op: LanguageModule's env-var handshake (NVTE_*_ATTN, asserting on the user's
        values) belongs to megatron's GPTModel; our kernels are chosen by
        ``model.attention_backend`` in specs.py."""

    # --- parameters -------------------------------------------------------------------------
    def casa_layers(self) -> List[CASATransformerLayer]:
        return [l for l in self.decoder.layers if isinstance(l, CASATransformerLayer)]

    def _tag_new_parameters(self) -> None:
        """``param.casa_new = True`` on weights that do not exist in the backbone (own LR group)."""
        for p in self.parameters():
            p.casa_new = False
        for layer in self.casa_layers():
            for p in layer.casa_parameters():
                p.casa_new = True
        if self.lm_first:
            for p in self.projector.parameters():
                p.casa_new = True
        for _, adapter in lora_adapters(self):
            for p in adapter.parameters():
                p.casa_new = True

    def apply_freezing(self) -> None:
        """LM frozen or not (CASA weights and LoRA adapters always train); ViT: all / none /
        last k blocks."""
        cfg = self.model_config
        if cfg.freeze_lm:
            for p in self.parameters():
                p.requires_grad_(False)
            for layer in self.casa_layers():
                for p in layer.casa_parameters():
                    p.requires_grad_(True)
        if hasattr(self, "vision"):
            trainable = cfg.vision.trained_blocks()  # global block indices
            for p in self.vision.parameters():
                p.requires_grad_(cfg.vision.trainable_blocks == -1)
            for i, block in enumerate(self.vision.blocks, start=self.vision.block_offset):
                for p in block.parameters():
                    p.requires_grad_(i in trainable)
        if self.lm_first:
            for p in self.projector.parameters():
                p.requires_grad_(cfg.vision.projector_trainable)
        for _, adapter in lora_adapters(self):  # LoRA adapters of frozen LM layers / encoder blocks
            adapter.requires_grad_(True)
        if cfg.trainable_tokens:  # rows of a frozen LM's vocabulary (model/token_rows.py)
            enable_token_rows(self, cfg.trainable_tokens)

    @torch.no_grad()
    def init_casa_from_self_attention(self) -> None:
        for layer in self.casa_layers():
            layer.init_casa_from_self_attention()

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules on every stage but the first."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # --- forward ----------------------------------------------------------------------------
    def vision_context(self, batch: VLMBatch, num_image_embeddings: Optional[int] = None) -> VisionContext:
        b, s = batch.shape
        counts = tokens_per_image(batch.image_grid_thw, self.model_config.vision.spatial_merge_size)
        windows = build_windows(
            b, s, batch.image_rows, batch.image_positions, counts,
            window_starts=window_start_marks(batch), position_ids=batch.position_ids,
            num_image_embeddings=num_image_embeddings,
        )
        if windows.num_image_tokens > self.image_seq_length * b:
            raise ValueError(f"micro-batch has {windows.num_image_tokens} image tokens but only "
                             f"image_seq_length * batch = {self.image_seq_length} * {b} slots")
        image_rotary = None
        if windows.num_image_tokens and self.image_position_scheme == "insertion":
            image_rotary = self.rotary(windows.image_key_positions)  # [i, 1, d]
        elif windows.num_image_tokens and self.image_position_scheme == "mrope":
            positions = casa_image_positions(batch.image_grid_thw, batch.image_rows, batch.image_positions,
                                             batch.position_ids, self.model_config.vision.spatial_merge_size,
                                             self.temporal_steps(batch))  # [3, i]
            image_rotary = mrope_freqs(self.rotary, positions.to(batch.position_ids.device),
                                       self.model_config.lm.resolved_mrope_section)  # [i, 1, d]
        return VisionContext(windows=windows, text_rotary=self.rotary.text_freqs(batch.position_ids),
                             image_rotary=image_rotary, num_image_tokens=windows.num_image_tokens)

    @property
    def image_position_scheme(self) -> str:
        cfg = self.model_config
        return cfg.fusion.resolved_image_position_scheme(cfg.vision.encoder)

    def temporal_steps(self, batch: VLMBatch) -> Tensor:
        return temporal_steps(batch.image_grid_thw, batch.image_second_per_grid,
                              self.model_config.vision.tokens_per_second)

    def self_attention_inputs(self, batch: VLMBatch, device):
        """(dense mask, None) on the reference path, (None, cu_seqlens per packed sample) else."""
        b, s = batch.shape
        if self.model_config.packed_attention:
            return None, params_from_sample_starts(batch.sample_starts, b, s, device)
        return block_causal_mask(batch.sample_starts, b, s, device), None

    # --- the encoder, whole or in pipeline parts ----------------------------------------------
    def text_and_encoder(self, batch: VLMBatch):
        """Text embeddings [s(/tp), b, h] and the encoder's activations [n, hv] after this
        stage's blocks, with the batch's geometry plan. The first stage embeds both; a later
        encoder stage unpacks them from what the previous one sent (:meth:`encoder_payload`)."""
        b, s = batch.shape
        device = batch.input_ids.device
        grid = self.vision.normalized_grid(batch.image_grid_thw)
        patches = batch.pixel_patches
        if patches.shape[0] == 0:  # one blank image runs instead (VisionEncoder.without_images)
            patches, grid = self.vision.blank_input(device)
        plan = self.vision.plan(grid, device)
        if self.pre_process:
            text = self.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids)  # [s(/tp), b, h]
            check_patches(patches, grid, self.vision.patch_dim)
            x = self.vision.embed(patches, plan)  # [n, hv]
        else:
            flat = self.input_tensor.view(-1)
            h = self.config.hidden_size
            text_numel = self.local_text_length(s) * b * h
            text = flat[:text_numel].view(-1, b, h)
            x = flat[text_numel:].view(-1, self.model_config.vision.hidden_size)
        return text, self.vision.run_blocks(x, plan), plan

    def local_text_length(self, s: int) -> int:
        """Text positions this rank holds between stages: ``s``, or ``s / tp`` under sequence parallelism."""
        return s // self.tp if self.sequence_parallel else s

    @staticmethod
    def encoder_payload(text: Tensor, x: Tensor) -> Tensor:
        """What an encoder-only stage sends: ``[s(/tp)*b*h + n*hv, 1, 1]``, a tensor of its own
        (megatron frees what it sent, which it refuses for a view)."""
        if text.dtype != x.dtype:
            raise TypeError(f"text embeddings ({text.dtype}) and encoder activations ({x.dtype}) must share "
                            "a dtype to travel as one pipeline tensor")
        return torch.cat([text.reshape(-1, 1, 1), x.reshape(-1, 1, 1)])

    def image_features(self, batch: VLMBatch, x: Tensor, plan) -> Tensor:
        """The encoder's last stage: activations -> features [n_patches, hv] ([0, hv] without images)."""
        features = self.vision.finish(x, plan)
        if batch.pixel_patches.shape[0] == 0:
            return features[:0] + 0 * features.sum()
        return features

    def text_and_image_tokens(self, batch: VLMBatch) -> Tuple[Tensor, Tensor]:
        """The stage that finishes the encoder: text embeddings [s(/tp), b, h] (the first stage) or
        what the previous stage sent, and the projected image tokens [n_tok, h]. Under
        ``reused_image_tokens`` (generation) the first stage takes the tokens of the previous
        forward when its encoder input is the same (``model/image_token_cache.py``)."""
        cache = self.image_token_cache if self.pre_process else None
        tokens = cache.lookup(batch) if cache is not None else None
        if tokens is not None:
            return self.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids), tokens
        text, x, plan = self.text_and_encoder(batch)
        tokens = self.projector(self.image_features(batch, x, plan))  # [n_tok, h]
        if cache is not None:
            cache.store(batch, tokens)
        return text, tokens

    def image_slots(self, tokens: Tensor, batch_size: int) -> Tensor:
        """Projected image tokens [n_tok, h] -> image slots [si(/tp), b, h] (zero-padded;
        SP-scattered when SP is on)."""
        slots = self.image_seq_length * batch_size
        padded = torch.nn.functional.pad(tokens, (0, 0, 0, slots - tokens.shape[0]))
        image_states = padded.view(self.image_seq_length, batch_size, -1)  # [si, b, h]
        if self.sequence_parallel:
            image_states = tensor_parallel.scatter_to_sequence_parallel_region(image_states)
        return image_states

    def forward(self, batch: VLMBatch) -> Tensor:
        """Encoder-only stages: ``encoder_payload``. First/middle LM stages: [s+si (/tp), b, h].
        Last stage: per-token loss [b, s] with labels, else TP-sharded logits [s, b, v/tp]."""
        b, s = batch.shape
        if self.encoder_only:
            return self.encoder_payload(*self.text_and_encoder(batch)[:2])
        if self.lm_first:
            # modules run in the order they are registered (embedding, vision, projector, decoder):
            # overlapped parameter gathering (parallel.overlap_param_gather) prefetches the
            # buckets in that order
            text, tokens = self.text_and_image_tokens(batch)  # [s(/tp), b, h], [n_tok, h]
            image_states = self.image_slots(tokens, b)  # [si(/tp), b, h]
        else:
            s_local = self.local_text_length(s)
            text, image_states = self.input_tensor[:s_local], self.input_tensor[s_local:]
        vision = self.vision_context(batch)
        mask, packed = self.self_attention_inputs(batch, text.device)
        text = self.decoder(text, image_states, vision, mask, packed)  # [s(/tp), b, h]
        if not self.post_process:
            return torch.cat([text, image_states], dim=0)
        logits = self.output_logits(text)  # [s, b, v/tp]
        if batch.labels is None:
            return logits
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), batch.labels.transpose(0, 1).contiguous())  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]

    def output_logits(self, hidden: Tensor) -> Tensor:
        """[s(/tp), b, h] -> TP-sharded logits [s, b, v_padded/tp]; padded columns are -inf."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, v_padded/tp]
        if self.padded_vocab_size == self.vocab_size:
            return logits
        local = logits.shape[-1]
        first = self.tp_group.rank() * local  # global index of this shard's column 0
        padded = torch.arange(first, first + local, device=logits.device) >= self.vocab_size
        return logits.masked_fill(padded, float("-inf"))

"""Model FLOPs of one micro-batch, counted from its metadata and the config (no model run).

Why analytic: torch's ``FlopCounterMode`` around a real step (``benchmarks/flops.py``) is exact
but far too slow to run every training step; this count is cheap (index bookkeeping of the
batch) and ``tests/training/test_model_flops.py`` proves its GEMM part equal, to the FLOP, to torch's
counter on a real forward + backward of every fusion, encoder and freezing variant.

What is counted -- what runs, TP=1 equivalent (the whole model, every token):

- GEMMs (2 FLOPs per multiply-add) of every linear layer: LM self-attention QKV (GQA width
  ``(heads + 2 groups) * head_dim``) and output projection, the SwiGLU MLP (``h -> 2 ffn -> h``),
  CASA / cross-attention projections for each placement (own or shared with self-attention;
  images through the K/V rows only with ``image_kv_only``, over all ``image_seq_length * b``
  image slots, zero-padded ones included, because that is what the GEMM multiplies), token
  insertion's LM layers over the combined ``s + image_seq_length`` stream, the vision encoder
  (patch embedding, blocks) over the micro-batch's patches (the one blank image it runs when a
  micro-batch has none: ``VisionEncoder.without_images``), the projector over the image tokens,
  and the output layer over the padded vocabulary; LoRA adapters (``model.lora``,
  ``model.vision.lora``) as two small GEMMs beside each adapted linear.
- Backward, as megatron runs it: a trainable weight costs its input gradient and its weight
  gradient (megatron's linear computes the input gradient even where nothing upstream needs it);
  a frozen weight (``freeze_lm``, ``vision.trainable_blocks``, ``vision.projector_trainable``)
  costs an input gradient only when its input requires a gradient, else nothing; the patch
  embedding (a torch ``Linear`` on pixels) never has an input gradient.
- Attention: visible (query, key) pairs -- causal within each packed sample for self-attention,
  CASA windows (images + causal text), cross-attention windows (images), vision segments
  (frames / Qwen2.5-VL windows, non-causal) -- times ``4 * head_dim * query_heads`` forward
  (QK^T and PV), twice that backward where the layer's backward runs.

Convention (Megatron-LM's): *model* FLOPs. Activation recomputation (``model.recompute``,
``model.vision.recompute``) and the recomputation inside flash-attention's backward are not
counted, and masked-out attention pairs are not counted, so MFU does not rise by redoing
work. Throughput per device = the step's model FLOPs over all data-parallel ranks / world size
(TP * PP * DP) / step time, as Megatron-LM's "throughput per GPU (TFLOP/s/GPU)".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from casa_megatron.config.schema import ModelConfig
from casa_megatron.model.batch import VLMBatch, window_start_marks

ATTENTION_FLOPS_PER_PAIR = 4  # QK^T and PV: 2 FLOPs each per (query, key, channel)


# --- attention pairs ---------------------------------------------------------------------------
def causal_pairs(lengths: torch.Tensor) -> int:
    """Visible pairs of causal self-attention over sequences of these lengths."""
    lengths = lengths.long()
    return int((lengths * (lengths + 1) // 2).sum())


def bottom_right_pairs(q_lens: torch.Tensor, kv_lens: torch.Tensor) -> int:
    """Visible pairs when query i of a window sees keys j <= i + nk - nq (CASA: images first)."""
    q, k = q_lens.long(), kv_lens.long()
    return int((q * (k - q) + q * (q + 1) // 2).sum())


def _image_tokens(model: ModelConfig, grid: List[List[int]]) -> torch.Tensor:
    """LM tokens of each image: t * h * w / merge^2 ([n_img] long)."""
    m2 = model.vision.spatial_merge_size ** 2
    return torch.tensor([t * h * w // m2 for t, h, w in grid], dtype=torch.long)


def _segments(starts: torch.Tensor):
    """[b, s] bool starts (row starts always open one) -> (flat begin [n], length [n]) of the
    segments of the row-major flatten; the same segments ``packed_seq_params`` builds."""
    b, s = starts.shape
    flat = starts.reshape(b * s).clone()
    flat[::s] = True
    begin = flat.nonzero().squeeze(1)
    return begin, torch.diff(begin, append=begin.new_tensor([b * s]))


def _per_segment(begin: torch.Tensor, key: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum of ``counts`` by the segment each flat index ``key`` falls in ([n] long)."""
    seg = torch.searchsorted(begin, key, right=True) - 1
    return torch.zeros(begin.numel(), dtype=torch.long).index_add_(0, seg, counts)


def layer_pairs(model: ModelConfig, batch: VLMBatch, image_seq_length: int,
                grid: Optional[List[List[int]]] = None) -> Tuple[int, int]:
    """(self-attention pairs of one LM layer, fusion pairs of one CASA / cross-attention layer).

    Straight from the batch's index tensors (a dozen small ops): self-attention is causal per
    packed sample (``sample_starts``; insertion: each sample with its inserted image tokens, and
    each row's padding up to ``s + image_seq_length`` as one more segment, as
    ``model/insertion.py`` lays it out); a CASA window (``window_start_marks``, as
    ``model/windows.py`` builds them) has its text as queries and its images + causal text as
    keys. tests/benchmarks/test_flops.py checks both against a count made from the definition.
    """
    b, s = batch.shape
    grid = batch.image_grid_thw.tolist() if grid is None else grid
    counts = _image_tokens(model, grid)  # [n_img]
    key = batch.image_rows.long().cpu() * s + batch.image_positions.long().cpu()  # [n_img] flat text index
    no_starts = torch.zeros(b, s, dtype=torch.bool)
    samples = no_starts if batch.sample_starts is None else batch.sample_starts.bool().cpu()
    begin, text = _segments(samples)
    if model.fusion.mechanism == "insertion":
        padding = image_seq_length - torch.zeros(b, dtype=torch.long).index_add_(0, key // s, counts)  # [b]
        lengths = torch.cat([text + _per_segment(begin, key, counts), padding[padding > 0]])
        return causal_pairs(lengths), 0
    marks = window_start_marks(batch)
    if marks is None:  # windows open at row starts and at every image
        marks = no_starts.clone()
        marks.view(-1)[key] = True
    window_begin, nq = _segments(marks.cpu())
    n_img = _per_segment(window_begin, key, counts)
    if model.fusion.mechanism == "casa":
        fusion = bottom_right_pairs(nq, nq + n_img)
    else:
        fusion = int((nq * n_img).sum())
    return causal_pairs(text), fusion


def attention_pairs(model: ModelConfig, batch: VLMBatch, image_seq_length: int) -> Dict[str, int]:
    """{"self_attention": pairs summed over its layers, "fusion": same for CASA / cross-attention}."""
    sa, fusion = layer_pairs(model, batch, image_seq_length)
    layers = model.lm.num_layers
    fused = len(model.fusion.fusion_layers(layers))
    sa_layers = layers - (fused if model.fusion.placement == "replace" else 0)
    return {"self_attention": sa_layers * sa, "fusion": fused * fusion}


def attention_flops(model: ModelConfig, pairs: int, passes: int = 3) -> int:
    """LM attention FLOPs of ``pairs``: forward (4 * d * heads per pair) plus, with the default
    ``passes=3``, backward (twice the forward); ``passes=1``: forward only (a frozen stretch)."""
    return passes * ATTENTION_FLOPS_PER_PAIR * model.lm.head_dim * model.lm.num_attention_heads * pairs


def vision_grid(model: ModelConfig, grid: List[List[int]]) -> List[List[int]]:
    """[t, h, w] patch grids the encoder runs on: the batch's ``grid``, or the one blank merge
    group it runs for a micro-batch without images (``VisionEncoder.without_images``)."""
    m = model.vision.spatial_merge_size
    return grid if grid else [[1, m, m]]


def vision_block_pairs(model: ModelConfig, grid: List[List[int]]) -> List[int]:
    """Visible (query, key) pairs of each vision block: every frame attends within itself, or,
    in Qwen2.5-VL's windowed blocks, within square windows of ``window_size`` px (the edge
    windows smaller), as ``model/vision/geometry.py`` partitions them."""
    v = model.vision
    full = sum(t * (h * w) ** 2 for t, h, w in grid)
    if v.encoder != "qwen2_5_vl" or v.fullatt_block_indexes is None:
        return [full] * v.num_layers
    m, units = v.spatial_merge_size, v.window_size // (v.patch_size * v.spatial_merge_size)

    def squares(n: int) -> int:  # sum of squared window sides along one axis of n merge units
        return (n // units) * units ** 2 + (n % units) ** 2

    windowed = sum(t * m ** 4 * squares(h // m) * squares(w // m) for t, h, w in grid)
    return [full if i in v.fullatt_block_indexes else windowed for i in range(v.num_layers)]


# --- GEMMs -------------------------------------------------------------------------------------
@dataclass
class _Ledger:
    """Running totals; ``linear`` returns whether its output requires a gradient."""

    gemm: int = 0
    attention: int = 0
    forward: int = 0  # the forward part of gemm + attention
    forward_gemm: int = 0  # ... of gemm
    parts: Dict[str, int] = field(default_factory=dict)
    _marked: Tuple[int, int, int] = (0, 0, 0)
    last_forward: int = 0  # forward FLOPs between the last two marks

    def linear(self, part: str, tokens: int, d_in: int, d_out: int, trainable: bool, input_grad: bool,
               always_dgrad: bool = True) -> bool:
        """megatron linears (``always_dgrad``) compute the input gradient whenever their weight
        trains; a torch ``Linear`` only when its input requires one."""
        forward = 2 * tokens * d_in * d_out
        dgrad = input_grad or (trainable and always_dgrad)
        flops = forward * (1 + int(dgrad) + int(trainable))
        self.gemm += flops
        self.forward += forward
        self.forward_gemm += forward
        self.parts[part] = self.parts.get(part, 0) + flops
        return trainable or input_grad

    def mark(self) -> Tuple[int, int]:
        """(gemm, attention) counted since the previous mark (its forward part: ``last_forward``)."""
        since = (self.gemm - self._marked[0], self.attention - self._marked[1])
        self.last_forward = self.forward - self._marked[2]
        self._marked = (self.gemm, self.attention, self.forward)
        return since

    def attend(self, part: str, pairs: int, width: int, backward: bool) -> None:
        forward = ATTENTION_FLOPS_PER_PAIR * width * pairs
        flops = (3 if backward else 1) * forward
        self.attention += flops
        self.forward += forward
        self.parts[part] = self.parts.get(part, 0) + flops


@dataclass(frozen=True)
class MicroBatchFlops:
    gemm: int
    attention: int
    parts: Dict[str, int]
    # where they run, (gemm, attention) each: every LM layer by global index, the output layer
    # (last stage), the encoder's pieces (patch embedding, each block, projector), which the
    # first stage holds, or the stages of ``parallel.vision_blocks_per_pipeline_stage``
    layers: Tuple[Tuple[int, int], ...] = ()
    output: Tuple[int, int] = (0, 0)
    patch_embed: Tuple[int, int] = (0, 0)
    vision_blocks: Tuple[Tuple[int, int], ...] = ()
    projector: Tuple[int, int] = (0, 0)
    # the forward part of each piece (the rest is backward; a frozen piece whose input needs no
    # gradient runs forward only): every LM layer, the encoder's pieces, the output layer
    forward_layers: Tuple[int, ...] = ()
    forward_encoder: Tuple[int, ...] = ()  # patch embedding, each block, projector
    forward_output: int = 0
    forward_gemm: int = 0  # the GEMMs of the forward alone (checked against torch's counter)

    @property
    def total(self) -> int:
        return self.gemm + self.attention

    @property
    def vision(self) -> Tuple[int, int]:
        """(gemm, attention) of the vision encoder and the projector."""
        return sum(self._encoder_pieces(0)), sum(self._encoder_pieces(1))

    @property
    def forward(self) -> int:
        return sum(self.forward_layers) + sum(self.forward_encoder) + self.forward_output

    def stages(self, layer_counts: List[int], vision_blocks: Optional[List[int]] = None) -> List[Tuple[int, int]]:
        """(gemm, attention) FLOPs of each pipeline stage holding ``layer_counts`` LM layers
        (``ParallelConfig.stage_layer_counts``) and ``vision_blocks`` encoder blocks
        (``ParallelConfig.stage_vision_blocks``; None: the whole encoder on the first stage).
        Their sum is this micro-batch's count; what a stage adds at PP > 1 is not counted (a
        stage's received input always computes its gradient)."""
        return list(zip(*(self._per_stage([c[k] for c in self.layers], self._encoder_pieces(k),
                                          self.output[k], layer_counts, vision_blocks) for k in (0, 1))))

    def stage_totals(self, layer_counts: List[int], vision_blocks: Optional[List[int]] = None) -> List[int]:
        """Model FLOPs (GEMMs + attention) of each pipeline stage, as ``stages``."""
        return [gemm + attention for gemm, attention in self.stages(layer_counts, vision_blocks)]

    def stage_forward_totals(self, layer_counts: List[int], vision_blocks: Optional[List[int]] = None) -> List[int]:
        """The forward part of ``stage_totals`` (1F1B runs a stage's forward and backward apart)."""
        return self._per_stage(list(self.forward_layers), list(self.forward_encoder), self.forward_output,
                               layer_counts, vision_blocks)

    def encoder_stages(self, num_stages: int, vision_blocks: Optional[List[int]] = None) -> List[Tuple[int, int]]:
        """(gemm, attention) of the encoder and projector on each stage: all on the first, or with
        ``vision_blocks`` the patch embedding on the first, each stage's blocks, the projector
        on the encoder's last stage."""
        return list(zip(*(_encoder_per_stage(self._encoder_pieces(k), num_stages, vision_blocks) for k in (0, 1))))

    def encoder_forward_stages(self, num_stages: int, vision_blocks: Optional[List[int]] = None) -> List[int]:
        """The forward part of ``encoder_stages`` (gemm + attention)."""
        return _encoder_per_stage(list(self.forward_encoder), num_stages, vision_blocks)

    def _encoder_pieces(self, k: int) -> List[int]:
        """Field ``k`` (0: gemm, 1: attention) of the patch embedding, each block, the projector."""
        return [self.patch_embed[k], *(block[k] for block in self.vision_blocks), self.projector[k]]

    def _per_stage(self, layers: List[int], encoder: List[int], output: int, layer_counts: List[int],
                   vision_blocks: Optional[List[int]]) -> List[int]:
        """One quantity per stage from its value for each LM layer, each encoder piece (patch
        embedding, blocks, projector) and the output layer."""
        if sum(layer_counts) != len(self.layers):
            raise ValueError(f"stages of {layer_counts} layers, but the model has {len(self.layers)}")
        out = [sum(chunk) + enc for chunk, enc in zip(_chunks(tuple(layers), layer_counts),
                                                      _encoder_per_stage(encoder, len(layer_counts), vision_blocks))]
        out[-1] += output
        return out


def _encoder_per_stage(encoder: List[int], num_stages: int, vision_blocks: Optional[List[int]]) -> List[int]:
    """A quantity of the encoder pieces (patch embedding, each block, projector) per stage: all on
    the first without ``vision_blocks``; else the patch embedding on the first, each stage's blocks,
    the projector on the encoder's last stage."""
    out = [0] * num_stages
    if vision_blocks is None or not any(vision_blocks[1:]):
        out[0] = sum(encoder)
        return out
    if sum(vision_blocks) != len(encoder) - 2 or len(vision_blocks) != num_stages:
        raise ValueError(f"encoder blocks per stage {vision_blocks}, but the encoder has "
                         f"{len(encoder) - 2} and the pipeline {num_stages} stages")
    out[0] += encoder[0]  # the patch embedding
    for stage, chunk in enumerate(_chunks(tuple(encoder[1:-1]), vision_blocks)):
        out[stage] += sum(chunk)
    out[max(i for i, n in enumerate(vision_blocks) if n)] += encoder[-1]  # projector: the encoder's last stage
    return out


def _chunks(items: tuple, counts: List[int]) -> List[tuple]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [items[start:start + count] for start, count in zip(starts, counts)]


def microbatch_flops(model: ModelConfig, batch: VLMBatch, image_seq_length: int) -> MicroBatchFlops:
    """Model FLOPs (forward + backward, TP=1 equivalent) of one micro-batch; see the module doc."""
    batch = _metadata_on_cpu(batch)
    b, s = batch.shape
    lm, fusion = model.lm, model.fusion
    ledger = _Ledger()
    grid = batch.image_grid_thw.tolist()  # [[t, h, w]] per image
    pieces: List[Tuple[int, int]] = []  # patch embedding, each block, projector
    forward_encoder: List[int] = []  # ... their forward parts
    image_grad = _vision(ledger, model, grid, pieces, forward_encoder)
    forward_layers: List[int] = []
    lm_train = not model.freeze_lm
    n_layers = lm.num_layers
    sa_pairs, fusion_pairs = layer_pairs(model, batch, image_seq_length, grid)
    vocab_train = lm_train or bool(model.trainable_tokens)  # model/token_rows.py: rows of a frozen LM
    text_grad = vocab_train  # the embedding's output
    layers: List[Tuple[int, int]] = []
    if fusion.mechanism == "insertion":
        tokens = b * (s + image_seq_length)  # the combined stream, padded to s + image_seq_length per row
        x = text_grad or image_grad
        for i in range(n_layers):
            x = _plain_layer(ledger, model, tokens, x, sa_pairs, i)
            layers.append(ledger.mark())
            forward_layers.append(ledger.last_forward)
    else:
        fused = set(fusion.fusion_layers(n_layers))
        x = text_grad
        for i in range(n_layers):
            if i in fused:
                x = _casa_layer(ledger, model, b * s, b * image_seq_length, x, image_grad, sa_pairs, fusion_pairs, i)
            else:
                x = _plain_layer(ledger, model, b * s, x, sa_pairs, i)
            layers.append(ledger.mark())
            forward_layers.append(ledger.last_forward)
    ledger.linear("output_layer", b * s, lm.hidden_size, lm.padded_vocab_size, vocab_train, x or vocab_train)
    output = ledger.mark()
    return MicroBatchFlops(ledger.gemm, ledger.attention, dict(ledger.parts), layers=tuple(layers),
                           output=output, patch_embed=pieces[0], vision_blocks=tuple(pieces[1:-1]),
                           projector=pieces[-1], forward_layers=tuple(forward_layers),
                           forward_encoder=tuple(forward_encoder), forward_output=ledger.last_forward,
                           forward_gemm=ledger.forward_gemm)


def _metadata_on_cpu(batch: VLMBatch) -> VLMBatch:
    """The small index tensors the count reads, on the CPU (one copy of a few [b, s] tensors;
    the pixels are not read: an empty slice stands in for them)."""
    import dataclasses

    if not batch.input_ids.is_cuda:
        return batch
    small = {f.name: getattr(batch, f.name).cpu() for f in dataclasses.fields(batch)
             if torch.is_tensor(getattr(batch, f.name)) and f.name not in ("pixel_patches", "labels", "loss_mask")}
    return dataclasses.replace(batch, **small, pixel_patches=batch.pixel_patches[:0].cpu())


def _adapted_linear(ledger: _Ledger, lora, layer: int, target: str, part: str, tokens: int,
                    d_in: int, d_out: int, train: bool, x_grad: bool) -> bool:
    """A megatron linear and, where ``lora`` (a LoRAConfig) adapts it, its adapter: ``A`` [r, in]
    and ``B`` [out, r] as torch matmuls (an input gradient only where the input needs one), both
    trained; with DoRA also ``B A`` ([out, r] x [r, in], forward only: the weight norm is
    detached). Returns whether the output requires a gradient."""
    out = ledger.linear(part, tokens, d_in, d_out, train, x_grad)
    if not lora.adapts(target, layer):
        return out
    ledger.linear(f"{part}.lora_a", tokens, d_in, lora.rank, True, x_grad, always_dgrad=False)
    ledger.linear(f"{part}.lora_b", tokens, lora.rank, d_out, True, True, always_dgrad=False)
    if lora.dora:
        ledger.linear(f"{part}.dora_norm", d_out, lora.rank, d_in, False, False, always_dgrad=False)
    return True


def _lm_linear(ledger: _Ledger, model: ModelConfig, layer: int, target: str, part: str, tokens: int,
               d_in: int, d_out: int, train: bool, x_grad: bool) -> bool:
    return _adapted_linear(ledger, model.lora, layer, target, part, tokens, d_in, d_out, train, x_grad)


def _attention(ledger: _Ledger, model: ModelConfig, part: str, tokens: int, x_grad: bool, norm_train: bool,
               proj_train: bool, pairs: int, layer: int) -> bool:
    """megatron self-attention (QKV, core attention, output projection); returns its output's grad."""
    lm = model.lm
    h, d = lm.hidden_size, lm.head_dim
    xn = x_grad or norm_train
    qkv = _lm_linear(ledger, model, layer, "linear_qkv", f"{part}.qkv", tokens, h,
                     (lm.num_attention_heads + 2 * lm.num_query_groups) * d, proj_train, xn)
    ledger.attend(f"{part}.core", pairs, lm.num_attention_heads * d, qkv)
    return _lm_linear(ledger, model, layer, "linear_proj", f"{part}.proj", tokens, lm.num_attention_heads * d, h,
                      proj_train, qkv)


def _mlp(ledger: _Ledger, model: ModelConfig, tokens: int, h_grad: bool, layer: int) -> bool:
    lm, train = model.lm, not model.freeze_lm
    hn = h_grad or train  # pre-MLP norm
    fc1 = _lm_linear(ledger, model, layer, "linear_fc1", "lm.mlp.fc1", tokens, lm.hidden_size,
                     2 * lm.ffn_hidden_size, train, hn)
    fc2 = _lm_linear(ledger, model, layer, "linear_fc2", "lm.mlp.fc2", tokens, lm.ffn_hidden_size,
                     lm.hidden_size, train, fc1)
    return h_grad or fc2


def _plain_layer(ledger: _Ledger, model: ModelConfig, tokens: int, x_grad: bool, sa_pairs: int, layer: int) -> bool:
    train = not model.freeze_lm
    sa = _attention(ledger, model, "lm.self_attention", tokens, x_grad, train, train, sa_pairs, layer)
    return _mlp(ledger, model, tokens, x_grad or sa, layer)


def _casa_layer(ledger: _Ledger, model: ModelConfig, tokens: int, slots: int, x_grad: bool, image_grad: bool,
                sa_pairs: int, fusion_pairs: int, layer: int) -> bool:
    """CASATransformerLayer: the placements of model/casa_layer.py."""
    fusion, lm_train = model.fusion, not model.freeze_lm
    # CASA's own projections are new weights (always trained); shared ones are the LM's.
    proj_train = lm_train if fusion.share_projections else True
    if fusion.placement == "parallel":
        sa = _attention(ledger, model, "lm.self_attention", tokens, x_grad, lm_train, lm_train, sa_pairs, layer)
        casa = _fusion(ledger, model, tokens, slots, x_grad, image_grad, True, proj_train, fusion_pairs)
        h = x_grad or sa or casa
    elif fusion.placement == "before":
        x = _fusion(ledger, model, tokens, slots, x_grad, image_grad, True, proj_train, fusion_pairs) or x_grad
        h = _attention(ledger, model, "lm.self_attention", tokens, x, lm_train, lm_train, sa_pairs, layer) or x
    else:  # replace: the CASA block reads the layer's input norm (an LM weight)
        h = _fusion(ledger, model, tokens, slots, x_grad, image_grad, lm_train, proj_train, fusion_pairs) or x_grad
    return _mlp(ledger, model, tokens, h, layer)


def _fusion(ledger: _Ledger, model: ModelConfig, tokens: int, slots: int, x_grad: bool, image_grad: bool,
            norm_train: bool, proj_train: bool, pairs: int) -> bool:
    """CASAAttention (model/casa_attention.py) behind its norm, and the tanh gate."""
    lm, fusion = model.lm, model.fusion
    h, d = lm.hidden_size, lm.head_dim
    qkv_width = (lm.num_attention_heads + 2 * lm.num_query_groups) * d
    text = ledger.linear("fusion.qkv_text", tokens, h, qkv_width, proj_train, x_grad or norm_train)
    image_in = image_grad or (fusion.normalize_images and norm_train)
    # images: the K/V rows only (kv_projection.py), or the whole fused QKV with the queries dropped
    image_width = 2 * lm.num_query_groups * d if fusion.image_kv_only else qkv_width
    image = ledger.linear("fusion.kv_image", slots, h, image_width, proj_train, image_in)
    core = text or image
    ledger.attend("fusion.core", pairs, lm.num_attention_heads * d, core)
    out = ledger.linear("fusion.proj", tokens, lm.num_attention_heads * d, h, proj_train, core)
    return out or fusion.cross_attention_gate  # the gate alpha is a trained CASA weight


def _vision(ledger: _Ledger, model: ModelConfig, images: List[List[int]], pieces: List[Tuple[int, int]],
            forward: List[int]) -> bool:
    """Encoder + projector; returns whether the image tokens require a gradient. ``pieces`` gets
    the (gemm, attention) of the patch embedding, each block and the projector (with the final
    norm's nothing), in that order, ``forward`` their forward parts (the ledger is fresh: the
    first mark counts from its start)."""

    def piece() -> None:
        pieces.append(ledger.mark())
        forward.append(ledger.last_forward)

    v = model.vision
    grid = vision_grid(model, images)
    patches = sum(t * h * w for t, h, w in grid)
    hv = v.hidden_size
    k = v.trainable_blocks
    trainable = [i in v.trained_blocks() for i in range(v.num_layers)]
    x = ledger.linear("vision.patch_embed", patches, v.patch_dim, hv, k == -1, False, always_dgrad=False)
    piece()
    for i, (train, pairs) in enumerate(zip(trainable, vision_block_pairs(model, grid))):
        def linear(target: str, part: str, d_in: int, d_out: int, x_grad: bool) -> bool:
            return _adapted_linear(ledger, v.lora, i, target, part, patches, d_in, d_out, train, x_grad)

        qkv = linear("linear_qkv", "vision.qkv", hv, 3 * hv, x)
        ledger.attend("vision.core", pairs, hv, qkv)
        proj = linear("linear_proj", "vision.proj", hv, hv, qkv)
        h = x or proj
        fc1 = linear("linear_fc1", "vision.fc1", hv, 2 * v.padded_ffn_hidden_size, h or train)
        fc2 = linear("linear_fc2", "vision.fc2", v.padded_ffn_hidden_size, hv, fc1)
        x = h or fc2
        piece()
    features = x or k == -1  # tiny_vit's final norm trains with the rest of the encoder
    tokens = patches // v.spatial_merge_size ** 2 if images else 0  # the blank image's: dropped
    ptrain = v.projector_trainable
    merged = features or ptrain  # the projector's norm
    fc1 = ledger.linear("projector.fc1", tokens, hv * v.spatial_merge_size ** 2,
                        v.projector_width(model.lm.hidden_size), ptrain, merged)
    out = ledger.linear("projector.fc2", tokens, v.projector_width(model.lm.hidden_size), model.lm.hidden_size,
                        ptrain, fc1)
    piece()
    return out

"""The whole VLM under tensor and pipeline parallelism (1F1B and the interleaved schedule) equals
one process (CPU, gloo, 2 ranks), for every fusion: CASA (several placements), cross-attention
(gated or not) and insertion.

The one-process reference runs the reference paths (dense block-causal self-attention mask,
image tokens through the whole fused QKV); every layout, TP=1 included, runs packed
self-attention by cu_seqlens and the K/V-only image projection (tests/support/equivalence.py)."""

from __future__ import annotations

import pytest
from support.dist import run_distributed
from support.equivalence import pp_worker, tp_pp_worker, tp_worker, vpp_worker
from support.vlm import QWEN_VISION

TP_VARIANTS = {
    "casa_parallel": {},
    "casa_shared_every_2": {"share_projections": True, "every_n": 2},
    "cross_attention_replace": {"mechanism": "cross_attention", "placement": "replace", "every_n": 2},
    "cross_attention_gated": {"mechanism": "cross_attention", "cross_attention_gate": True},
    "insertion": {"mechanism": "insertion"},
    "casa_qwen_encoder_mrope": {"vision": QWEN_VISION},
    "insertion_qwen_encoder_mrope": {"mechanism": "insertion", "vision": QWEN_VISION},
    # activation recomputation: the recomputed forward repeats TP / SP collectives in backward
    "casa_recompute_uniform_2": {"recompute": {"granularity": "full", "method": "uniform", "num_layers": 2}},
    "insertion_recompute_block_1": {"mechanism": "insertion",
                                    "recompute": {"granularity": "full", "method": "block", "num_layers": 1}},
    # selective: the attention kernels and MLPs (the row-parallel fc2's reduce(-scatter)) run again
    "casa_selective_core_attn_mlp": {"recompute": {"granularity": "selective", "modules": ["core_attn", "mlp"]}},
    "insertion_qwen_selective_mlp": {"mechanism": "insertion", "vision": QWEN_VISION,
                                     "recompute": {"granularity": "selective", "modules": ["mlp"]}},
    # per-head q/k RMSNorms (Qwen3): CASA's own (copied from SA), shared with SA, and the baseline's;
    # each TP rank's norm gradient covers its heads only and must be summed over TP
    "casa_qk_layernorm": {"lm": {"qk_layernorm": True}},
    "casa_qk_layernorm_replace": {"lm": {"qk_layernorm": True}, "placement": "replace", "every_n": 2},
    "cross_attention_shared_qk_layernorm": {"lm": {"qk_layernorm": True}, "mechanism": "cross_attention",
                                            "share_projections": True},
    "insertion_qk_layernorm": {"lm": {"qk_layernorm": True}, "mechanism": "insertion"},
}


@pytest.mark.parametrize("variant", list(TP_VARIANTS))
def test_tensor_parallel_matches_single_process(variant):
    """TP=1, TP=2 without and with sequence parallelism: loss, logits and every gradient."""
    fusion = dict(TP_VARIANTS[variant])
    lm = fusion.pop("lm", None)
    report = run_distributed(tp_worker, world_size=2, vision=fusion.pop("vision", None),
                             recompute=fusion.pop("recompute", None), fusion=fusion,
                             model_fields={"lm": lm} if lm else None)[0]
    assert set(report["max_grad_err"]) == {(1, False), (2, False), (2, True)}
    if lm:  # the norms exist and train: q/k of self-attention, of CASA unless it shares them
        qk = [n for n in report["trained"] if n.endswith(("q_layernorm.weight", "k_layernorm.weight"))]
        assert qk and all(".self_attention." in n or ".casa_attention." in n for n in qk), qk
        assert any(".casa_attention." in n for n in qk) == ("share_projections" not in fusion
                                                            and fusion.get("mechanism") != "insertion")
    if TP_VARIANTS[variant].get("cross_attention_gate"):  # alpha replicated, SP-tagged, learns
        assert len(report["gate_grads"]) == 4 and all(abs(g) > 0 for g in report["gate_grads"])


# (fusion, a global layer index on stage 1 that must hold a CASA module, or None)
PP_VARIANTS = {
    "casa_parallel": ({}, 3),
    "casa_before_layers_1_2": ({"placement": "before", "layers": [1, 2]}, 2),
    "cross_attention": ({"mechanism": "cross_attention"}, 3),
    "insertion": ({"mechanism": "insertion"}, None),
    "casa_qwen_encoder_mrope": ({"vision": QWEN_VISION}, 3),
    "casa_recompute_uniform_1": ({"recompute": {"granularity": "full", "method": "uniform", "num_layers": 1}}, 3),
    "casa_selective_core_attn_mlp": ({"recompute": {"granularity": "selective", "modules": ["core_attn", "mlp"]}}, 3),
    # uneven splits (parallel.num_layers_in_first/last_pipeline_stage): 1 + 3 and 3 + 1 of 4 layers
    "casa_uneven_first_1": ({"split": (1, None)}, 3),
    "insertion_uneven_last_1": ({"mechanism": "insertion", "split": (None, 1)}, None),
    # the encoder over both stages (parallel.vision_blocks_per_pipeline_stage = [1, 1]): stage 0
    # runs the embedding and block 0, stage 1 block 1, the projector and all 4 LM layers; the
    # middle micro-batch has no image (the blank image crosses the stages). The Qwen encoder has
    # a narrower width than the LM (24 vs 32) and its window / full blocks on either side.
    "casa_encoder_split": ({"vision_split": [1, 1], "text_only": (1,)}, 3),
    "insertion_qwen_encoder_split": ({"mechanism": "insertion", "vision": {**QWEN_VISION, "hidden_size": 24},
                                      "vision_split": [1, 1], "text_only": (1,)}, None),
    "casa_qwen_encoder_split_recompute": ({"vision": {**QWEN_VISION, "hidden_size": 24}, "vision_split": [1, 1],
                                           "recompute": {"granularity": "full", "method": "uniform",
                                                         "num_layers": 1}}, 3),
}


@pytest.mark.parametrize("variant", list(PP_VARIANTS))
def test_pipeline_parallel_matches_single_process(variant):
    """PP=2 through megatron's 1F1B schedule, 3 micro-batches: losses and all gradients,
    including the vision encoder's, which lives on stage 0 and receives gradient from stage 1."""
    fusion, casa_layer_on_stage_1 = PP_VARIANTS[variant]
    fusion = dict(fusion)
    split, vision_split = fusion.pop("split", (None, None)), fusion.pop("vision_split", None)
    first, second = run_distributed(pp_worker, world_size=2, vision=fusion.pop("vision", None),
                                    recompute=fusion.pop("recompute", None), split=split, vision_split=vision_split,
                                    text_only=fusion.pop("text_only", ()), fusion=fusion)
    expected = {(None, None): (2, 2), (1, None): (1, 3), (None, 1): (3, 1)}[split]
    if vision_split:
        expected = (0, 4)
    assert (first["layers"], second["layers"]) == expected
    assert any(n.startswith("vision.") for n in first["checked"])
    assert not set(first["checked"]) & set(second["checked"])
    assert any(n.startswith("decoder.layers.3.") for n in second["checked"])
    if casa_layer_on_stage_1 is not None:
        assert any(n.startswith(f"decoder.layers.{casa_layer_on_stage_1}.casa_attention")
                   for n in second["checked"])
    assert first["vision_grad_norm"] > 0
    if vision_split:  # block 1 and the projector on stage 1, which also trains them
        assert "vision.blocks.1.self_attention.linear_qkv.weight" in second["checked"]
        assert not any(n.startswith("vision.blocks.1.") for n in first["checked"])
        assert any(n.startswith("projector.") for n in second["checked"])
        assert second["vision_grad_norm"] > 0
    else:
        assert not any(n.startswith("vision.") for n in second["checked"])


@pytest.mark.parametrize("fusion", [{}, {"mechanism": "insertion"}], ids=["casa", "insertion"])
def test_encoder_split_under_tensor_and_sequence_parallelism(fusion):
    """4 ranks, TP=2 with sequence parallelism x PP=2, the encoder over both stages: the text
    embeddings cross the stages as SP shards beside the (TP-replicated) encoder activations, and
    the losses and every gradient equal one process's."""
    reports = run_distributed(tp_pp_worker, world_size=4, fusion=fusion, vision=QWEN_VISION, vision_split=[1, 1])
    stages = {r["stage"]: set(r["checked"]) for r in reports}
    assert any(n.startswith("vision.blocks.0.") for n in stages[0])
    assert any(n.startswith("vision.blocks.1.") for n in stages[1]) and any(n.startswith("projector.") for n in stages[1])


VPP_VARIANTS = {
    "casa_parallel": {},
    "casa_before_layers_1_2": {"placement": "before", "layers": [1, 2]},
    "cross_attention_gated": {"mechanism": "cross_attention", "cross_attention_gate": True},
    "insertion": {"mechanism": "insertion"},
    "insertion_qwen_encoder_mrope": {"mechanism": "insertion", "vision": QWEN_VISION},
    # activation recomputation inside each chunk
    "casa_recompute_uniform_1": {"recompute": {"granularity": "full", "method": "uniform", "num_layers": 1}},
}


@pytest.mark.parametrize("variant", list(VPP_VARIANTS))
def test_interleaved_pipeline_matches_single_process(variant):
    """PP=2 with two model chunks per rank (``parallel.virtual_pipeline_model_parallel_size=2``)
    through megatron's interleaved schedule, 4 micro-batches: losses and every gradient. Rank 0
    holds LM layers 0 and 2 and the encoder, rank 1 layers 1 and 3 and the output layer; the
    image tokens ride along through all four virtual stages and back."""
    fusion = dict(VPP_VARIANTS[variant])
    first, second = run_distributed(vpp_worker, world_size=2, vision=fusion.pop("vision", None),
                                    recompute=fusion.pop("recompute", None), fusion=fusion)
    assert (first["first_layers"], second["first_layers"]) == ([0, 2], [1, 3])
    assert set(first["checked"]).isdisjoint(second["checked"])
    assert set(first["checked"]) | set(second["checked"]) == set(first["trained"])  # every gradient compared
    assert any(n.startswith("vision.") for n in first["checked"])
    assert not any(n.startswith("output_layer.") for n in first["checked"])
    assert any(n.startswith("output_layer.") for n in second["checked"])
    assert not any(n.startswith("vision.") for n in second["checked"])
    if fusion.get("mechanism") != "insertion":
        for layer, stage in ((1, second), (2, first)):
            assert any(n.startswith(f"decoder.layers.{layer}.casa_attention") for n in stage["checked"])


@pytest.mark.parametrize("fusion", [{}, {"mechanism": "insertion"}], ids=["casa", "insertion"])
def test_interleaved_pipeline_with_an_uneven_split(fusion):
    """Uneven stages cut into chunks (6 LM layers, ``num_layers_in_first_pipeline_stage=2``: rank 0
    holds layers 0 and 3 beside the encoder, rank 1 layers 1-2 and 4-5): losses and every
    gradient equal one process's, as megatron-core's offsets place the layers."""
    first, second = run_distributed(vpp_worker, world_size=2, fusion=fusion, vision=QWEN_VISION,
                                    model_fields={"lm": {"num_layers": 6}}, split=(2, None))
    assert (first["first_layers"], second["first_layers"]) == ([0, 3], [1, 4])
    assert set(first["checked"]) | set(second["checked"]) == set(first["trained"])
    layers = lambda stage: {int(n.split(".")[2]) for n in stage["checked"] if n.startswith("decoder.layers.")}
    assert layers(first) == {0, 3} and layers(second) == {1, 2, 4, 5}


@pytest.mark.parametrize("fusion", [{}, {"mechanism": "insertion"}], ids=["casa", "insertion"])
def test_interleaved_pipeline_under_tensor_and_sequence_parallelism(fusion):
    """4 ranks: TP=2 with sequence parallelism x PP=2 with two model chunks per rank: the SP shards
    of text and image slots cross the four virtual stages, and the losses and every gradient
    (gathered over TP) equal one process's."""
    reports = run_distributed(vpp_worker, world_size=4, fusion=fusion, vision=QWEN_VISION)
    stages = {r["stage"]: r for r in reports}  # the two TP ranks of a stage report the same names
    assert stages[0]["first_layers"] == [0, 2] and stages[1]["first_layers"] == [1, 3]
    assert set(stages[0]["checked"]) | set(stages[1]["checked"]) == set(stages[0]["trained"])

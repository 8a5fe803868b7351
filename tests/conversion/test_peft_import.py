"""``import-hf`` with a PEFT LoRA adapter: trained by PEFT in transformers, merged on import.

For each family a tiny random HF model gets a PEFT adapter with random ``A`` and ``B``
(``init_lora_weights=False``; PEFT's own ``A`` for each of ``q_proj`` / ``k_proj`` / ``v_proj``,
which megatron's fused QKV could not hold as one adapter): Qwen2 (biases, tied embeddings, a
``rank_pattern`` and an ``alpha_pattern``), Helium (rsLoRA; its Q/K rows are permuted on import)
and Qwen2.5-VL (DoRA on LM and vision-encoder linears). ``import-hf BASE --adapter DIR`` must give

* every megatron tensor of ``import-hf`` of PEFT's own ``merge_and_unload()`` result (the oracle
  for what a merge is), and
* the logits of the PEFT model in transformers (text, fp32).

The adapter is found by itself in ``BASE/lora_adapter`` (what ``export-hf --lora separate``
writes; that round trip is tested in tests/hf/test_peft_adapter.py). Bad adapters (trained biases, modules
the checkpoint lacks, a folder that is not an adapter) stop with exit code 2, naming the problem,
and write nothing.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from support.dist import run_distributed
from support.hf import VOCAB, hf_logits, make_hf_model, save_hf_model, text_batch

LM_ONLY = ["model.fusion.mechanism=insertion", "model.transformer_impl=local"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qwen2": dict(r=2, lora_alpha=4, target_modules=LINEARS, rank_pattern={"down_proj": 3},
                  alpha_pattern={"o_proj": 6}),
    "helium": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen2_5_vl": dict(r=2, lora_alpha=4, use_dora=True,  # DoRA; the last four linears: the encoder's too
                       target_modules=["q_proj", "v_proj", "qkv", "gate_proj", "up_proj", "down_proj"]),
    # trained rows of the input embedding (PEFT's trainable_token_indices), untied and tied (the LM
    # head shares them), and whole trained modules (modules_to_save) beside the LoRA pairs
    "helium_token_rows": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 5, 97]),
    "qwen2_token_rows_tied": dict(r=2, lora_alpha=4, target_modules=["o_proj"],
                                  trainable_token_indices={"embed_tokens": [0, 98]}),
    "llama_saved_modules": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
}
FAMILY = {"helium_token_rows": "helium", "qwen2_token_rows_tied": "qwen2", "llama_saved_modules": "llama"}
VOCABULARY_TABLES = {"embedding.word_embeddings.weight", "output_layer.weight"}
AUTO = "helium"  # its adapter sits in BASE/lora_adapter and is found without --adapter


def _peft(model, **fields):
    """PEFT's model with random A and B; DoRA magnitudes moved off the norms PEFT starts them at
    (else DoRA's rescaling would be 1 and merge like plain LoRA)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape))
            if "trainable_tokens_delta" in name or "modules_to_save" in name:  # trained away from the copy
                p.add_(0.3 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (base folder, adapter folder, PEFT-merged folder, ids, PEFT logits)."""
    root = tmp_path_factory.mktemp("peft_import")
    out = {}
    for seed, (family, fields) in enumerate(ADAPTERS.items()):
        base = save_hf_model(make_hf_model(FAMILY.get(family, family), seed=seed), root / family / "base")
        torch.manual_seed(100 + seed)
        model = _peft(make_hf_model(FAMILY.get(family, family), seed=seed), **fields)
        adapter = base / "lora_adapter" if family == AUTO else root / family / "adapter"
        model.save_pretrained(str(adapter))
        ids = text_batch(seed)
        logits = hf_logits(model, ids)
        merged = save_hf_model(model.merge_and_unload(), root / family / "merged")
        out[family] = (str(base), str(adapter), str(merged), ids.numpy(), logits.numpy())
    # an adapter that trains biases too
    _peft(make_hf_model("qwen2"), r=2, target_modules=["q_proj"], bias="all").save_pretrained(str(root / "biases"))
    # a trained copy of a tied model's input embedding (PEFT unties it from the LM head)
    _peft(make_hf_model("qwen2"), r=2, target_modules=["q_proj"],
          modules_to_save=["embed_tokens"]).save_pretrained(str(root / "tied_saved"))
    return root, out


def _cli(*argv):
    from casa_megatron.conversion.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _worker(rank, world, root, sources, biases, tied_saved):
    from support.export import load_weights
    from support.hf_equivalence import build_pretrained, full_logits

    root, report = Path(root), {}
    for family, (base, adapter, merged, ids, ref) in sources.items():
        extra = [] if family == AUTO else ["--adapter", adapter]
        code, err = _cli("import-hf", base, root / f"{family}_adapter", *LM_ONLY, "--no-progress", *extra)
        assert code == 0, err
        code, err2 = _cli("import-hf", merged, root / f"{family}_merged", *LM_ONLY, "--no-progress")
        assert code == 0, err2
        code, err3 = _cli("import-hf", base, root / f"{family}_base", *LM_ONLY, "--no-progress", "--adapter", "none")
        assert code == 0, err3
        ours, oracle = load_weights(root / f"{family}_adapter"), load_weights(root / f"{family}_merged")
        plain = load_weights(root / f"{family}_base")
        logits = full_logits(build_pretrained(root / f"{family}_adapter"), torch.as_tensor(ids), VOCAB)
        report[family] = {
            "names_equal": sorted(ours) == sorted(oracle),
            "max_diff": max((ours[n] - oracle[n]).abs().max().item() for n in ours),
            "changed": sorted(n for n in ours if not torch.equal(ours[n], plain[n])),
            "logits_err": (logits - torch.as_tensor(ref)).abs().max().item(),
            "merge_note": "merging the LoRA adapter" in err}
    qwen2_base = sources["qwen2"][0]
    bad = {"biases": _cli("import-hf", qwen2_base, root / "o_biases", "--adapter", biases, *LM_ONLY),
           "other_modules": _cli("import-hf", qwen2_base, root / "o_other", "--adapter",
                                 sources["qwen2_5_vl"][1], *LM_ONLY),
           "not_an_adapter": _cli("import-hf", qwen2_base, root / "o_none", "--adapter", root, *LM_ONLY),
           "tied_saved": _cli("import-hf", qwen2_base, root / "o_tied", "--adapter", tied_saved, *LM_ONLY)}
    report["bad"] = {k: (code, err, (root / f"o_{k.split('_')[0]}").exists()) for k, (code, err) in bad.items()}
    return report


@pytest.fixture(scope="module")
def imports(sources, tmp_path_factory):
    root, srcs = sources
    report, = run_distributed(_worker, world_size=1, root=str(tmp_path_factory.mktemp("imports")), sources=srcs,
                              biases=str(root / "biases"), tied_saved=str(root / "tied_saved"))
    return report


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_import_with_a_peft_adapter_equals_the_peft_merge(imports, family):
    r = imports[family]
    assert r["names_equal"] and r["max_diff"] < 1e-5, r
    assert r["logits_err"] < 1e-4, r
    assert r["merge_note"]
    changed = r["changed"]  # the adapted weights moved, nothing else did
    assert changed and all(n.endswith(".weight") and ("linear_" in n or n in VOCABULARY_TABLES) for n in changed), changed
    tables = VOCABULARY_TABLES & set(changed)
    if family in FAMILY:  # the input embedding (and a saved LM head) trained; the untied heads of the
        # token-row adapters did not (PEFT adapts the input embedding only)
        assert tables == ({"embedding.word_embeddings.weight", "output_layer.weight"} if family == "llama_saved_modules"
                          else {"embedding.word_embeddings.weight"}), changed
    else:
        assert not tables, changed
    if family == "qwen2_5_vl":
        assert any(n.startswith("vision.blocks.") and "linear_qkv" in n for n in changed)
        assert any(n.startswith("vision.blocks.") and "linear_fc1" in n for n in changed)
    if family == "helium":  # attention only
        assert not any("mlp" in n for n in changed)


def test_bad_adapters_are_named_and_nothing_is_written(imports):
    bad = imports["bad"]
    messages = {"biases": "bias='all': the adapter trains biases",
                "other_modules": "the adapter adapts 8 modules the checkpoint does not have: ['model.visual.blocks.",
                "not_an_adapter": "not a PEFT adapter folder (no adapter_config.json)",
                "tied_saved": "model.embed_tokens.weight of a model with tied embeddings"}
    for case, (code, err, written) in bad.items():
        assert code == 2 and messages[case] in err and not written, (case, err)


def test_pattern_lookup_follows_peft():
    from casa_megatron.conversion.peft_import import _pattern_value

    patterns = {"down_proj": 3, r"layers\.1\.self_attn\.q_proj": 5}
    assert _pattern_value(patterns, "model.layers.0.mlp.down_proj", 2) == 3
    assert _pattern_value(patterns, "model.layers.1.self_attn.q_proj", 2) == 5
    assert _pattern_value(patterns, "model.layers.0.self_attn.q_proj", 2) == 2
    assert _pattern_value(patterns, "model.layers.0.mlp.xdown_proj", 2) == 2  # a dotted suffix, not a substring

"""``import-hf --add-tokens``: a Helium-style base LM whose tokenizer has neither a chat template
nor our layout tokens (the data pipeline refuses it) gets them, with embedding and output rows at
the mean of the known rows; the old tokens' logits still equal transformers'; the pipeline lays
samples out with the extended tokenizer; the export holds every row its tokenizer can produce and
transformers loads and generates with it.

Two tokenizers on the same random Helium model (vocabulary 99): one of 99 tokens (the new ids
100..102 grow the vocabulary) and one of 84 (the new ids fall on rows the checkpoint already has
past its tokenizer, as in Qwen's padded vocabulary: re-initialised, the vocabulary keeps 99)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.dist import run_distributed
from support.hf import VOCAB, hf_logits, make_hf_model, save_hf_model
from support.hf_equivalence import TOL, build_pretrained, full_logits

LM_ONLY = ["model.fusion.mechanism=insertion", "model.transformer_impl=local"]
LAYOUT = ["<image>", "<answer>", "<eot>"]
SIZES = {"grows": VOCAB, "fits": 84}  # tokenizer sizes before the extension


def _helium_tokenizer(out: Path, size: int) -> None:
    """A Helium-like word tokenizer: <pad> <s> </s> <unk> (ids 0-3, as the config), no template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("add_tokens")
    model = make_hf_model("helium", seed=3)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, min(SIZES.values()), (2, 10), generator=g)  # known tokens only
    ref = hf_logits(model, ids)
    out = {}
    for case, size in SIZES.items():
        folder = save_hf_model(model, root / case)
        _helium_tokenizer(folder, size)
        out[case] = str(folder)
    return root, out, ids, ref


def _import(rank, world, sources, root):
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.conversion.importer import import_hf
    from support.export import load_weights

    report = {}
    for case, hf_dir in sources.items():
        result = import_hf(hf_dir, f"{root}/{case}", None, LM_ONLY, progress=False, add_tokens="layout")
        weights = load_weights(result.out_dir)
        model_cfg = result.config.model
        report[case] = {"vocab": model_cfg.lm.vocab_size, "out": str(result.out_dir),
                        "emb": weights["embedding.word_embeddings.weight"].clone(),
                        "head": weights["output_layer.weight"].clone()}
        assert isinstance(model_cfg, ModelConfig)
    return report


def _logits(rank, world, directory, ids, vocab):
    return full_logits(build_pretrained(directory, overrides=LM_ONLY), torch.as_tensor(ids), vocab)[..., :VOCAB]


def _export(rank, world, directory, out):
    from support.hf_checkpoint_export import export_checkpoint

    return str(export_checkpoint(directory, out))


@pytest.fixture(scope="module")
def imported(sources):
    root, dirs, ids, ref = sources
    report, = run_distributed(_import, world_size=1, sources=dirs, root=str(root / "imported"))
    return report


def test_the_layout_tokens_are_added_with_rows_at_the_mean(imported, sources):
    from transformers import AutoTokenizer

    for case, size in SIZES.items():
        r = imported[case]
        tok = AutoTokenizer.from_pretrained(r["out"])
        assert tok.convert_tokens_to_ids(LAYOUT) == [size, size + 1, size + 2], case
        assert tok.encode("w1 <eot> w2", add_special_tokens=False) == [5, size + 2, 6]
        assert r["vocab"] == max(VOCAB, size + 3), case
        assert r["emb"].shape[0] % 128 == 0 and r["emb"].shape[0] >= r["vocab"]
        for name in ("emb", "head"):
            rows = torch.as_tensor(r[name])
            mean = rows[:size].float().mean(dim=0)
            for i in range(size, size + 3):
                assert torch.allclose(rows[i].float(), mean, atol=1e-6), (case, name, i)
            assert not torch.allclose(rows[0], rows[1])  # the known rows are the checkpoint's
        source = json.loads((Path(r["out"]) / "import_report.json").read_text())["source"]["added_tokens"]
        assert source["tokens"] == dict(zip(LAYOUT, range(size, size + 3)))


def test_known_tokens_keep_transformers_logits(imported, sources):
    _, _, ids, ref = sources
    for case in SIZES:
        ours, = run_distributed(_logits, world_size=1, directory=imported[case]["out"], ids=ids.numpy(),
                                vocab=imported[case]["vocab"])
        ours = torch.as_tensor(ours)
        # the rows of the new ids were rewritten where they existed ("fits"): compare the others
        keep = [v for v in range(VOCAB) if not SIZES[case] <= v < SIZES[case] + 3]
        assert torch.allclose(ours[..., keep], ref[..., keep], **TOL), case
        assert ref.abs().max() > 1.0


def test_the_pipeline_refuses_the_source_tokenizer_and_lays_out_with_the_extended_one(imported, sources):
    from casa_megatron.data.processor import ProcessorSettings, make_layout

    _, dirs, _, _ = sources
    with pytest.raises(ValueError, match="<image>|layout"):
        make_layout(ProcessorSettings(dirs["grows"], 64, 64, text_layout="auto"))
    layout = make_layout(ProcessorSettings(imported["grows"]["out"], 64, 64, text_layout="auto"))
    assert type(layout).__name__ == "LayoutTokens"


def test_the_export_holds_every_row_and_transformers_generates(imported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = imported["grows"]
    out, = run_distributed(_export, world_size=1, directory=r["out"], out=str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert len(tok) == model.config.vocab_size == VOCAB + 3
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 3 and torch.equal(emb[VOCAB:].float(), torch.as_tensor(r["emb"])[VOCAB: VOCAB + 3].float())
    ids = torch.tensor([tok.encode("w1 w2 <answer>", add_special_tokens=False)])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_present_tokens_are_left_alone_and_nothing_is_asked_twice(tmp_path):
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.vocab_extension import extend_tokenizer, requested_tokens

    _helium_tokenizer(tmp_path, 10)
    assert requested_tokens("layout", {"answer_token": "<ans>"}) == ["<image>", "<ans>", "<eot>"]
    assert requested_tokens(" <a>, <b>,<a>,", {}) == ["<a>", "<b>"]
    with pytest.raises(ConversionError, match="no token"):
        requested_tokens(" , ", {})
    added = extend_tokenizer(tmp_path, ["</s>", "<x>"])
    assert added.present == ["</s>"] and added.tokens == ["<x>"] and added.ids == [10]
    assert added.vocab_size(99) == 99 and added.vocab_size(10) == 11
    with pytest.raises(ConversionError, match="no tokenizer"):
        extend_tokenizer(tmp_path / "nothing_here", ["<x>"])


def test_a_frozen_recipe_is_told_how_to_train_the_new_rows(capsys):
    """With model.freeze_lm the new rows would stay at the mean: the import names the override
    that trains them (model.trainable_tokens, tests/model/test_token_rows.py), and is silent once
    the recipe lists them."""
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.conversion.vocab_extension import AddedTokens, say

    added = AddedTokens(tokens=["<image>", "<eot>"], ids=[99, 100], known_rows=99, tokenizer=None)
    say(added, ModelConfig(freeze_lm=True, trainable_tokens=[7]))
    assert "rows [99, 100] stay at that mean" in capsys.readouterr().err
    say(added, ModelConfig(freeze_lm=True, trainable_tokens=[7]))
    assert "model.trainable_tokens=[7,99,100]" in capsys.readouterr().err
    say(added, ModelConfig(freeze_lm=False))
    say(added, ModelConfig(freeze_lm=True, trainable_tokens=[99, 100]))
    assert "warning" not in capsys.readouterr().err

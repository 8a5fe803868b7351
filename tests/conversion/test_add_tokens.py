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


# --- a PEFT fine-tune that added tokens itself (resized vocabulary, modules_to_save) ----------
NEW_TOKENS = ["<tool>", "<call>"]


def _fine_tune_with_new_tokens(root: Path, saved_modules, with_tokenizer: bool = True):
    """(base folder, adapter folder, PEFT-merged folder, ids with the new tokens, PEFT logits):
    a 99-token Helium base, its tokenizer given two tokens, the model resized to 101 rows and
    wrapped by PEFT with LoRA + ``modules_to_save``, trained (random), saved with its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = save_hf_model(make_hf_model("helium", seed=3), root / "base")
    _helium_tokenizer(base, VOCAB)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    model = make_hf_model("helium", seed=3)
    model.resize_token_embeddings(len(tok))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                            modules_to_save=list(saved_modules))).eval()
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape))
    adapter = root / "adapter"
    peft.save_pretrained(str(adapter))
    if with_tokenizer:
        tok.save_pretrained(str(adapter))
    ids = torch.tensor([[4, VOCAB, 7, VOCAB + 1, 9, 5]])  # known and new tokens
    merged = save_hf_model(peft.merge_and_unload(), root / "merged")
    tok.save_pretrained(str(merged))
    return base, adapter, merged, ids, hf_logits(peft, ids)


def _import_grown(rank, world, base, adapter, merged, out, ids):
    from casa_megatron.conversion.importer import import_hf
    from support.export import load_weights

    ours = import_hf(base, f"{out}/ours", None, LM_ONLY, progress=False, adapter=adapter)
    oracle = import_hf(merged, f"{out}/oracle", None, LM_ONLY, progress=False, adapter="none")
    a, b = load_weights(ours.out_dir), load_weights(oracle.out_dir)
    logits = full_logits(build_pretrained(ours.out_dir, overrides=LM_ONLY), torch.as_tensor(ids),
                         VOCAB + len(NEW_TOKENS))
    return {"vocab": ours.config.model.lm.vocab_size, "names_equal": sorted(a) == sorted(b),
            "max_diff": max((a[n].float() - b[n].float()).abs().max().item() for n in a),
            "logits": logits, "out": str(ours.out_dir)}


def test_a_peft_fine_tune_that_added_tokens_imports_with_its_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    base, adapter, merged, ids, ref = _fine_tune_with_new_tokens(tmp_path, ["embed_tokens", "lm_head"])
    got, = run_distributed(_import_grown, world_size=1, base=str(base), adapter=str(adapter), merged=str(merged),
                           out=str(tmp_path / "imports"), ids=ids.numpy())
    assert got["vocab"] == VOCAB + len(NEW_TOKENS)
    assert got["names_equal"] and got["max_diff"] == 0.0  # exactly PEFT's merge, imported
    torch.testing.assert_close(torch.as_tensor(got["logits"]), ref, **TOL)  # the new tokens' rows included
    tok = AutoTokenizer.from_pretrained(got["out"])  # the fine-tune's tokenizer came with the import
    assert len(tok) == VOCAB + len(NEW_TOKENS) and tok.convert_tokens_to_ids(NEW_TOKENS) == [VOCAB, VOCAB + 1]
    report = json.loads((Path(got["out"]) / "import_report.json").read_text())
    assert report["source"]["tokenizer_from"] == str(adapter.resolve())


@pytest.mark.parametrize("case", ["no_tokenizer", "head_not_saved"])
def test_a_grown_vocabulary_that_cannot_be_rebuilt_is_refused(tmp_path, case):
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.peft_import import AdapterMergedReader
    from casa_megatron.conversion.safetensors_io import SafetensorsReader

    saved = ["embed_tokens"] if case == "head_not_saved" else ["embed_tokens", "lm_head"]
    base, adapter, *_ = _fine_tune_with_new_tokens(tmp_path, saved, with_tokenizer=case != "no_tokenizer")
    message = {"no_tokenizer": "no tokenizer lies beside the adapter",
               "head_not_saved": "but not in ['lm_head.weight']: the new rows of those were never saved"}[case]
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AdapterMergedReader(SafetensorsReader(base), adapter)

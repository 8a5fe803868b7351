"""The tiny local tokenizer and the layout-token conventions."""

from __future__ import annotations

import pickle

import pytest

from casa_megatron.data.records import SampleError
from casa_megatron.data.tokenization import TextTokenizer, build_word_tokenizer, load_tokenizer


def test_tokenizer_loads_from_local_path_with_auto_tokenizer(tokenizer_dir):
    hf = load_tokenizer(tokenizer_dir)
    ids = hf.encode("What colour is the shape ?", add_special_tokens=False)
    assert hf.unk_token_id not in ids and len(ids) == 6  # one word, one token; lower-cased
    assert hf.decode(ids) == "what colour is the shape ?"


def test_generated_vocabulary_is_covered_and_small(tokenizer_dir):
    from casa_megatron.data.synthetic_media import vocabulary

    tok = TextTokenizer(tokenizer_dir)
    ids = tok.encode(" ".join(vocabulary()))
    assert len(ids) == len(vocabulary()) and load_tokenizer(tokenizer_dir).unk_token_id not in ids
    assert tok.vocab_size < 512  # fits the default model vocabulary


def test_special_ids_and_reserved_tokens(tokenizer_dir):
    tok = TextTokenizer(tokenizer_dir)
    sp = tok.special
    assert len(sp.all()) == 5 and sp.pad == 0
    with pytest.raises(SampleError) as info:
        tok.encode("look <image> here", key="k9")
    assert info.value.reason == "reserved_token" and "k9" in str(info.value)


def test_missing_layout_token_is_named(tmp_path):
    path = build_word_tokenizer(["a b c"], tmp_path / "tok")
    with pytest.raises(ValueError, match="'<frame>'"):
        TextTokenizer(path, image_token="<frame>")


def test_tokenizer_pickles_for_process_workers(tokenizer_dir):
    tok = pickle.loads(pickle.dumps(TextTokenizer(tokenizer_dir)))
    assert tok.encode("red circle") == TextTokenizer(tokenizer_dir).encode("red circle")


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def _train_with_vocab(rank, world, tokenizer_dir, vocab, run_dir):
    from casa_megatron.config import load_config
    from casa_megatron.config.errors import ConfigError
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu.yaml", [
        f"data.source={tokenizer_dir.parent}/shards", f"data.tokenizer_path={tokenizer_dir}",
        f"model.lm.vocab_size={vocab}", f"run_dir={run_dir}", "tracking.enabled=false"])
    try:
        train(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_the_model(tokenizer_dir, tmp_path):
    """Ids past ``model.lm.vocab_size`` would read padding rows or fail deep in a step (a device
    assert on a GPU): the run stops at start-up, naming both sizes, before anything is written."""
    from support.dist import run_distributed

    from casa_megatron.data.config import DataConfig
    from casa_megatron.data.tokenization import check_vocabulary

    size = len(load_tokenizer(tokenizer_dir))
    data = DataConfig(source=str(tokenizer_dir.parent / "shards"), tokenizer_path=str(tokenizer_dir))
    check_vocabulary(data, size)  # exactly fits
    check_vocabulary(DataConfig(), 1)  # the in-memory synthetic task has no tokenizer
    with pytest.raises(ValueError, match=f"has {size} tokens but model.lm.vocab_size is {size - 1}"):
        check_vocabulary(data, size - 1)
    # two ranks: rank 0 reads the tokenizer, both stop with its verdict
    messages = run_distributed(_train_with_vocab, world_size=2, tokenizer_dir=tokenizer_dir, vocab=size - 1,
                               run_dir=str(tmp_path / "run"))
    assert len(messages) == 2 and all(m and f"ids {size - 1}..{size - 1} have no embedding row" in m for m in messages)
    run = tmp_path / "run"  # the session's lock and writable check only: no config, no checkpoint
    assert not (run / "config.yaml").exists() and not any((run / "checkpoints").iterdir())

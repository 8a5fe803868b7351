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

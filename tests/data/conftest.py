"""Shared data fixtures: one small generated dataset per session, and media builders."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Dict[str, Path]:
    """18 images (3 of each task) + 4 H.264 clips, 6 samples per shard, tokenizer, manifest."""
    from casa_megatron.data.synthetic_dataset import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), num_images=18, num_videos=4, seed=1,
                        samples_per_shard=6, progress=False)


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_dataset) -> Path:
    return tiny_dataset["tokenizer"]


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory) -> Path:
    """Qwen2.5-style BPE tokenizer with a Qwen2.5-VL-like chat template (built here, no download)."""
    from data.chat_tokenizers import qwen_style

    return qwen_style(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="session")
def helium_tokenizer(tmp_path_factory) -> Path:
    """Helium-style unigram tokenizer with its own plain-text chat template."""
    from data.chat_tokenizers import helium_style

    return helium_style(tmp_path_factory.mktemp("helium_tok"))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory) -> Path:
    """Llama-3-style BPE tokenizer with header-token turns and Llama 3.2 Vision's <|image|>."""
    from data.chat_tokenizers import llama3_style

    return llama3_style(tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(tmp_path_factory) -> Path:
    """Qwen-style BPE tokenizer whose template behaves as Qwen3's (an empty think block in the
    final assistant turn only)."""
    from data.chat_tokenizers import qwen3_style

    return qwen3_style(tmp_path_factory.mktemp("qwen3_tok"))


@pytest.fixture(scope="session")
def qwen3_text_tokenizer(tmp_path_factory) -> Path:
    """The Qwen3-style tokenizer with a text-only template (list contents render as '')."""
    from data.chat_tokenizers import QWEN3_TEXT_TEMPLATE, qwen3_style

    return qwen3_style(tmp_path_factory.mktemp("qwen3_text_tok"), QWEN3_TEXT_TEMPLATE)

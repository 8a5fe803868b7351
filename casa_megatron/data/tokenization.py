"""Text to token ids with a Hugging Face tokenizer loaded from a local path, plus the special
tokens of the sequence layout (see ``interleave.py``).

Conventions (names configurable in ``DataConfig``; the tokenizer must already contain them,
because adding tokens would silently change the vocabulary the model was built for):
    ``<image>``   one per image / frame; the image is inserted *before* it, so the placeholder is
                  the first query of the image's window (and marks images for inference).
    ``<answer>``  ends a question; the answer follows.
    ``<eot>``     ends an answer or a frame caption; it is a trained target (the model learns to stop).
    bos / pad     the tokenizer's own ``bos_token`` / ``pad_token`` (``<bos>`` / ``<pad>`` if unset).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from casa_megatron.data.records import SampleError


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    image: int
    answer: int
    end_of_turn: int

    def all(self) -> set:
        return {self.bos, self.pad, self.image, self.answer, self.end_of_turn}


class PerThreadTokenizer:
    """Mixin: the HF tokenizer at ``self.path``, one instance per thread (the Rust backend
    refuses concurrent use of one instance), loaded lazily; picklable for process workers (the
    instances are not pickled, each process loads its own)."""

    path: str

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: Dict) -> None:
        self.__dict__.update(state)

    @property
    def tokenizer(self):
        """This thread's Hugging Face tokenizer."""
        return self._get()

    def _get(self):
        local = self.__dict__.setdefault("_local", threading.local())
        tok = getattr(local, "tok", None)
        if tok is None:
            tok = local.tok = load_tokenizer(self.path)
            override = getattr(self, "template_override", None)
            if override:  # data.chat_template instead of the tokenizer's own
                tok.chat_template = override
        return tok


class TextTokenizer(PerThreadTokenizer):
    """Our layout tokens on top of a local HF tokenizer (thread-safe, picklable)."""

    def __init__(self, path: str | Path, image_token: str = "<image>", answer_token: str = "<answer>",
                 end_of_turn_token: str = "<eot>"):
        self.path = str(path)
        self.token_names = (image_token, answer_token, end_of_turn_token)
        self.special = self._resolve(self._get())

    def _resolve(self, tok) -> SpecialIds:
        ids = {}
        names = {"bos": tok.bos_token or "<bos>", "pad": tok.pad_token or "<pad>",
                 "image": self.token_names[0], "answer": self.token_names[1],
                 "end_of_turn": self.token_names[2]}
        for field, name in names.items():
            idx = tok.convert_tokens_to_ids(name)
            if idx is None or (tok.unk_token_id is not None and idx == tok.unk_token_id):
                raise ValueError(f"tokenizer at {self.path} has no {name!r} token (needed as the {field} "
                                 "token); a pretrained backbone gets it with `casa-convert import-hf ... --add-tokens layout`, "
                                 "a tokenizer of your own when it is built; or set data.*_token to a token it has")
            ids[field] = int(idx)
        return SpecialIds(**ids)

    @property
    def vocab_size(self) -> int:
        return len(self._get())

    def encode(self, text: str, key: str = "?") -> List[int]:
        """Plain text -> ids, never producing a layout token (a literal "<image>" in an annotation
        would otherwise create a placeholder without an image)."""
        ids = self._get().encode(text, add_special_tokens=False)
        reserved = self.special.all()
        if any(i in reserved for i in ids):
            raise SampleError("reserved_token", f"{key}: text {text[:60]!r} contains a reserved layout token")
        return ids

    def decode(self, ids: List[int]) -> str:
        return self._get().decode(ids)


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained`` on a local directory; never downloads."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_vocabulary(data, vocab_size: int) -> None:
    """The run's tokenizer fits the model's vocabulary (``data``: a DataConfig). A token id at or
    past ``model.lm.vocab_size`` would read a padding row of the embedding, whose logit is masked
    (an infinite loss where it is a label), or past the table (an index error on a CPU, a device
    assert on a GPU, steps into the run): refused before the model is built. Nothing to check for
    the in-memory synthetic task."""
    if data.is_synthetic:
        return
    path = data.resolved_tokenizer_path()
    if path is None:
        return  # DataConfig.validate names the missing tokenizer
    size = len(load_tokenizer(path))
    if size > vocab_size:
        from casa_megatron.config.errors import ConfigError

        raise ConfigError(f"the tokenizer at {path} has {size} tokens but model.lm.vocab_size is {vocab_size}: ids "
                         f"{vocab_size}..{size - 1} have no embedding row. Use the tokenizer the model was imported "
                         "with (casa-convert import-hf writes it into its folder; --add-tokens grows both together)")


def build_word_tokenizer(texts, out_dir: str | Path, extra_tokens: Optional[List[str]] = None,
                         chat_template: Optional[str] = None) -> Path:
    """Train a tiny lower-case word-level tokenizer on ``texts`` and save it as a HF tokenizer.

    For generated datasets and tests: every word of the corpus is one token, so answers such as
    colours or rendered digits map to single ids and accuracy is easy to read off. With a
    ``chat_template`` (its special tokens in ``extra_tokens``) the data pipeline lays samples out
    with the template, as it would with a real backbone's tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<answer>", "<eot>", *(extra_tokens or [])]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>",
                                   additional_special_tokens=specials[4:])
    if chat_template:
        fast.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out

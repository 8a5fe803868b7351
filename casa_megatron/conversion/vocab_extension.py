"""Tokens a backbone's tokenizer lacks, added at import (``import-hf --add-tokens``).

A base LM's tokenizer often has neither a chat template nor our layout tokens (Helium-1's:
``<s>``, ``</s>``, no ``<image>``), and the data pipeline then stops at start-up: it has no way to
mark an image, the end of a question or the end of an answer. LLaVA's answer, kept here: add the
tokens to the tokenizer and give the embedding (and an untied output layer) a row for each,
initialised to the mean of the rows of the tokens the tokenizer had, so that a new token starts
as an average token rather than as a zero or random vector that would dominate (or vanish from)
the first steps. transformers' ``resize_token_embeddings(mean_resizing=True)`` starts from the
same mean.

``--add-tokens layout`` adds the recipe's layout tokens (``data.image_token``,
``data.answer_token``, ``data.end_of_turn_token``: ``<image>``, ``<answer>``, ``<eot>`` by default);
``--add-tokens "A,B"`` any list (e.g. the tokens a ``data.chat_template`` needs). Tokens the
tokenizer already has are left alone and said. New ids follow the tokenizer's last id; where the
checkpoint's embedding already has rows there (Qwen's vocabulary is padded past its tokenizer),
those rows are re-initialised the same way, and the vocabulary grows only when it must. The
extended tokenizer is saved into the import, and the export writes it with the rows, so
transformers loads a model whose vocabulary holds every token its tokenizer can produce.

Added tokens are special (never split, never produced by ordinary text; ``reserved_token`` in the
data pipeline). Their rows train like any embedding row, but not where the LM is frozen
(``model.freeze_lm``): then they stay at the mean, which is enough for a marker the model reads
(``<image>``, ``<answer>``) and not for a token it must predict (``<eot>``). The import says so and
names the override that trains those rows alone (``model.trainable_tokens``, model/token_rows.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import torch

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.safetensors_io import WrappedReader

LAYOUT = "layout"  # --add-tokens layout: the recipe's layout tokens
LAYOUT_FIELDS = ("image_token", "answer_token", "end_of_turn_token")
# written by the extended tokenizer's save_pretrained: never copied from the source beside it
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json")


@dataclass
class AddedTokens:
    tokens: List[str]  # added, in id order
    ids: List[int]
    known_rows: int  # the tokenizer's size before: the rows whose mean starts the new ones
    tokenizer: Any = field(repr=False)  # the extended tokenizer, saved into the import
    present: List[str] = field(default_factory=list)  # asked for, already in the tokenizer

    def vocab_size(self, hf_vocab_size: int) -> int:
        """The model's vocabulary: the checkpoint's, grown to hold the new ids where it must."""
        return max(hf_vocab_size, max(self.ids) + 1) if self.ids else hf_vocab_size

    def to_json(self) -> dict:
        return {"tokens": dict(zip(self.tokens, self.ids)), "already_present": self.present,
                "initialised_from_mean_of_rows": self.known_rows}


def requested_tokens(spec: str, data: dict) -> List[str]:
    """``layout`` -> the recipe's layout tokens (``data`` = its raw data section), else the
    comma-separated list (blank entries and repeats dropped, order kept)."""
    from casa_megatron.data.config import DataConfig

    if spec.strip() == LAYOUT:
        defaults = DataConfig()
        return [str(data.get(name, getattr(defaults, name))) for name in LAYOUT_FIELDS]
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ConversionError(f"--add-tokens {spec!r}: no token given (a comma-separated list, or 'layout')")
    return list(dict.fromkeys(tokens))


def extend_tokenizer(hf_dir: str | Path, tokens: List[str]) -> AddedTokens:
    """Load ``hf_dir``'s tokenizer and add the tokens it lacks (special, never split)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"--add-tokens: {hf_dir} has no tokenizer transformers can load ({exc})") from exc
    vocab = tok.get_vocab()
    present = [t for t in tokens if t in vocab]
    new = [t for t in tokens if t not in vocab]
    known = len(tok)
    if new:
        tok.add_tokens(new, special_tokens=True)
    ids = tok.convert_tokens_to_ids(new)
    for token, i in zip(new, ids):
        if tok.encode(token, add_special_tokens=False) != [i]:
            raise ConversionError(f"--add-tokens: {token!r} was added as id {i} but does not encode to it")
    return AddedTokens(new, list(ids), known, tok, present)


def vocabulary_names(table) -> List[str]:
    """The HF tensors with a row per token: the LM table's rows converted by ``PadVocab``."""
    from casa_megatron.conversion.mapping import as_row
    from casa_megatron.conversion.transforms import PadVocab

    return [r.hf for r in map(as_row, table.rows) if isinstance(r.transform, PadVocab)]


class VocabExtendedReader(WrappedReader):
    """A checkpoint reader (``SafetensorsReader`` interface) whose embedding and LM head come out
    as transformers' ``resize_token_embeddings`` would leave them, with the new tokens' rows at
    the mean of the known ones: the extension happens in HF space, before the mapping tables, so
    the tables pad, split and export these tensors as any others."""

    def __init__(self, reader, added: AddedTokens, vocab_size: int, names: List[str]):
        super().__init__(reader)
        self.added, self.vocab_size = added, vocab_size
        self.extended = {n for n in names if n in reader}

    def shape(self, name: str):
        shape = tuple(self.reader.shape(name))
        return (self.vocab_size, *shape[1:]) if name in self.extended else shape

    def get(self, name: str) -> torch.Tensor:
        weight = self.reader.get(name)
        if name not in self.extended:
            return weight
        known = self.added.known_rows
        out = torch.zeros(self.vocab_size, *weight.shape[1:], dtype=weight.dtype)  # [V_new, h]
        rows = min(weight.shape[0], self.vocab_size)
        out[:rows] = weight[:rows]
        out[self.added.ids] = weight[:known].float().mean(dim=0).to(weight.dtype)
        return out


def say(added: AddedTokens, model) -> None:
    """What was added, and (a frozen LM) how to let the new rows train; ``model``: the recipe's
    ``ModelConfig``."""
    if added.present:
        print(f"import-hf: --add-tokens: already in the tokenizer, left alone: {added.present}", file=sys.stderr)
    if not added.tokens:
        return
    listing = ", ".join(f"{t} = {i}" for t, i in zip(added.tokens, added.ids))
    print(f"import-hf: added {len(added.tokens)} tokens ({listing}); their embedding rows start at the mean of the "
          f"{added.known_rows} rows of the tokenizer's own tokens", file=sys.stderr)
    untrained = [i for i in added.ids if i not in model.trainable_tokens]
    if model.freeze_lm and untrained:
        ids = ",".join(str(i) for i in sorted(set(model.trainable_tokens) | set(added.ids)))
        print(f"import-hf: warning: the recipe freezes the LM (model.freeze_lm): rows {untrained} stay at that mean, "
              "fine for markers the model reads, not for tokens it must learn to produce (an end-of-turn token); "
              f"train them with model.trainable_tokens=[{ids}]", file=sys.stderr)

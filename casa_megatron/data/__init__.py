"""Data: samples on disk (tar shards / JSONL manifest) -> decoded, tokenized, packed ``VLMBatch``.

Entry point: ``make_train_iterator(cfg, micro_batch_size, dp_rank, dp_size, seed)`` (loader.py).
Module map (one job each; see docs/data.md):
  config        DataConfig                 records      sample/batch records and errors
  shards        tar index/read/write       manifest     JSONL manifest of local files
  sources       random access over either  sampler      per-epoch, per-DP-rank order
  annotations   conversation / captions    tokenization HF tokenizer + layout tokens
  image_processing  smart resize           video/       frame plan, PyAV and DALI decoders
  interleave    sequence layout, windows   processor    raw sample -> TokenizedSample
  packing       first-fit packer, collate  workers      ordered thread/process pool
  loader        the resumable iterator     synthetic*   generated tasks and datasets
Heavy dependencies (av, transformers, DALI) are imported where they are used.
"""

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator

__all__ = ["DataConfig", "make_train_iterator"]

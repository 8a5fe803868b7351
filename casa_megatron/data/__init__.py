"""Data: samples on disk (tar shards / manifest / JSON datasets) -> decoded, tokenized, packed ``VLMBatch``.

Entry point: ``make_train_iterator(cfg, micro_batch_size, dp_rank, dp_size, seed)`` (loader.py).
Module map (one job each; see docs/data.md):
  config        DataConfig                 records      sample/batch records and errors
  shards        tar index/read/write       manifest     JSONL manifest of local files
  shard_index   saved, mmapped tar indexes recipe       LLaVA-OneVision YAML recipes, subsets
  parquet       hub Parquet -> tar shards  locations    files of the folders a user names
  inspect       a run's data as training sees it (tools/inspect_data.py)
  span_index    saved byte spans of JSON datasets  prepare  a run's indexes, shared among ranks
  json_dataset  LLaVA / chat .json(l)      sources      random access over any of them
  sampler       per-epoch, per-DP order    blend        weighted mix of sources, resumable
  index_shuffle a keyed bijection per position (data.order: stateless)
  formats       ours / LLaVA / HF messages conversation the parsed form of every format
  annotations   our conversation/captions  tokenization HF tokenizer + layout tokens
  chat_template the tokenizer's template    interleave   our layout tokens, windows
  image_processing  smart resize           video/       frame plan, PyAV and DALI decoders
  processor     raw sample -> TokenizedSample
  packing       first-fit packer, collate  workers      ordered thread/process pool
  loader        the resumable iterator     synthetic*   generated tasks and datasets
Heavy dependencies (av, transformers, DALI) are imported where they are used.
"""

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_eval_iterator, make_train_iterator

__all__ = ["DataConfig", "make_eval_iterator", "make_train_iterator"]

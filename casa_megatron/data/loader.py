"""The training data iterator: ``make_train_iterator(cfg, micro_batch_size, dp_rank, dp_size, seed)``.

Real data flows: blend + sampler (which source and which of its samples next, per DP rank and
epoch) -> ordered worker pool (read bytes, decode, tokenize: ``processor.py``) -> packing
buffer -> first-fit packer -> ``VLMBatch``. The position of the stream is the number of draws
from each source; the packer's buffer holds samples that were read but not yet packed.
``state_dict()`` records the position and the buffer's sample positions (not their pixels), so
``load_state_dict`` re-decodes those few samples and the resumed run yields exactly the batches
an uninterrupted run would have. Prefetched samples are not state: they are dropped and decoded
again. ``make_eval_iterator`` reads ``data.valid`` the same way, from its start.

Bad data: a sample that fails (corrupt/truncated/empty media, missing part, bad annotation,
unsupported codec, too long) is skipped, counted by reason and logged with its key and shard.
A shard with nothing readable fails at start-up (naming it); an epoch in which every sample of
this rank failed, or ``MAX_CONSECUTIVE_FAILURES`` failures in a row, stops the run (a broken
dataset should not spin forever).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

from casa_megatron.data.config import DataConfig
from casa_megatron.data.packing import Packer
from casa_megatron.data.processor import ProcessorSettings, SampleProcessor
from casa_megatron.data.records import SampleError, SampleInfo, ShardError, TokenizedSample
from casa_megatron.data.blend import BlendOrder
from casa_megatron.data.sources import SampleSource, SourceSpec, open_sources
from casa_megatron.data.synthetic import SAMPLE_LEN, SyntheticBatches
from casa_megatron.data.video import resolve_decoder
from casa_megatron.data.workers import OrderedPool
from casa_megatron.model.batch import VLMBatch

logger = logging.getLogger("casa_megatron.data")
MAX_CONSECUTIVE_FAILURES = 1000
STATE_VERSION = 2


class _LoadSample:
    """Worker job: (source, sample index) -> (TokenizedSample | SampleError, seconds). Picklable."""

    def __init__(self, sources: List[SampleSource], processor: SampleProcessor):
        self.sources, self.processor = sources, processor

    def __call__(self, item: Tuple[int, int]):
        source, index = item
        src = self.sources[source]
        start = time.perf_counter()
        try:
            out = self.processor(src.read(index))
        except SampleError as e:
            out = e
        except Exception as e:  # noqa: BLE001 - a decoder bug on odd input must not stop the run
            out = SampleError("unexpected_error", f"{src.key(index)} in {src.location(index)}: "
                              f"{type(e).__name__}: {e}")
        return out, time.perf_counter() - start


class TrainIterator:
    """Packed ``VLMBatch`` micro-batches from one source or a weighted blend (``blend.py``).

    A source is a shard directory, a .tar, a JSONL manifest or a JSON dataset. The stream's
    position is the number of draws from each source; a buffered sample is known by
    ``ref = (source, draw)``.
    """

    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 fusion: str = "casa", specs: Optional[List[SourceSpec]] = None):
        self.cfg, self.b, self.seed = cfg, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # data recipes become one source per dataset, weighted by the samples each selects
        self.specs, self.sources = open_sources(specs or cfg.source_specs(), cfg.index_dir)
        self.processor = SampleProcessor(ProcessorSettings.from_config(cfg, resolve_decoder(cfg.decoder), fusion))
        self.blend = BlendOrder([len(s) for s in self.sources], [s.weight for s in self.specs],
                                dp_rank, dp_size, seed, cfg.shuffle, cfg.order)
        self.packer = Packer(micro_batch_size, cfg.seq_length, cfg.image_seq_length,
                             self.processor.pad_id, cfg.image_mean, cfg.image_std,
                             temporal_patch_size=cfg.temporal_patch_size or 1, fps=cfg.fps)
        self.pool = OrderedPool(_LoadSample(self.sources, self.processor), cfg.num_workers, cfg.worker_type)
        self.prefetch = cfg.prefetch or 4 * max(1, cfg.num_workers)
        self.buffer: List[TokenizedSample] = []
        self.last_batch_samples: List[SampleInfo] = []
        n = len(self.sources)
        self._consumed = [0] * n  # draws per source handed to the packer (or skipped)
        self._submitted = [0] * n  # draws per source sent to the workers
        self._good_in_epoch = [0] * n
        self._counters: Counter = Counter()  # seen, skipped, failures_in_row, epochs_done
        self._skips: Counter = Counter()
        self._skipped_keys: Dict[str, List[str]] = {}  # reason -> first few keys (for the log / MLflow)
        self._reported: set = set()  # (source, index) of bad samples already named in a warning
        self._decode_s = 0.0
        self._wait_s = 0.0
        self._t0: Optional[float] = None

    # --- stream ---------------------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self.pool) < self.prefetch:
            (source, draw), = self.blend.draws(self._submitted, 1)
            self.pool.submit((source, self.blend.sample_index(source, draw)))

    def _next_sample(self) -> TokenizedSample:
        while True:
            self._fill()
            result, seconds = self.pool.get()
            (source, draw), = self.blend.draws(self._consumed, 1)
            self._decode_s += seconds
            self._counters["seen"] += 1
            good = not isinstance(result, SampleError)
            if good:
                self._good_in_epoch[source] += 1
                self._counters["failures_in_row"] = 0
            else:
                self._skip(source, draw, result)
            if (draw + 1) % self.blend.epoch_length(source) == 0:
                self._end_epoch(source, draw // self.blend.epoch_length(source))
            if good:
                result.ref = (source, draw)
                return result

    def _skip(self, source: int, draw: int, error: SampleError) -> None:
        index = self.blend.sample_index(source, draw)
        src = self.sources[source]
        key = src.key(index)
        self._counters["skipped"] += 1
        self._counters["failures_in_row"] += 1
        self._skips[error.reason] += 1
        keys = self._skipped_keys.setdefault(error.reason, [])
        if len(keys) < 5:
            keys.append(key)
        # Named once (a bad sample fails again every epoch): later skips of it go to DEBUG; the
        # counts by reason keep growing (skip_counts()).
        first = (source, index) not in self._reported
        self._reported.add((source, index))
        logger.log(logging.WARNING if first else logging.DEBUG, "skipped sample %r from %s (%s): %s%s", key,
                   src.location(index), error.reason, error, "" if first else " (again)")
        if self._counters["failures_in_row"] >= MAX_CONSECUTIVE_FAILURES:
            raise ShardError(f"{MAX_CONSECUTIVE_FAILURES} samples in a row failed on dp rank {self.dp_rank} "
                             f"(reasons so far: {dict(self._skips)}); last: {error}")

    def _end_epoch(self, source: int, epoch: int) -> None:
        if self._good_in_epoch[source] == 0:
            raise ShardError(f"epoch {epoch} on dp rank {self.dp_rank}: none of its "
                             f"{self.blend.epoch_length(source)} samples of {self.specs[source].path} could be "
                             f"used (reasons: {dict(self._skips)})")
        self._good_in_epoch[source] = 0
        self._counters["epochs_done"] += 1

    # --- iterator -------------------------------------------------------------------------------
    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> VLMBatch:
        start = time.perf_counter()
        if self._t0 is None:
            self._t0 = start
        while len(self.buffer) < self.cfg.pack_buffer:
            self.buffer.append(self._next_sample())
        batch, self.last_batch_samples, self.buffer = self.packer.next_batch(self.buffer)
        self._wait_s += time.perf_counter() - start
        if self.cfg.log_interval and self.packer.stats.batches % self.cfg.log_interval == 0:
            self._log()
        return batch

    def _log(self) -> None:
        st = self.stats()
        logger.info("data rank %d: %d batches, %.1f samples/s, text slots %.1f%%, image slots %.1f%%, "
                    "skipped %d/%d %s, waited %.1f s", self.dp_rank, st["batches"], st["samples_per_s"],
                    100 * st["text_utilization"], 100 * st["image_utilization"], st["samples_skipped"],
                    st["samples_seen"], st["skipped_by_reason"] or "", st["wait_s"])

    # --- state ----------------------------------------------------------------------------------
    def _identity(self) -> Dict:
        identity = {"kind": "shards", "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                    "sources": [{"num_samples": len(src), "weight": spec.weight}
                                for src, spec in zip(self.sources, self.specs)]}
        if self.cfg.order != "permutation" and self.cfg.shuffle:  # (states of permutation runs: unchanged)
            identity["order"] = self.cfg.order  # a position means another sample under another order
        return identity

    def state_dict(self) -> Dict:
        """JSON-safe position of the stream: enough to continue exactly (same cfg, rank, world)."""
        return {"version": STATE_VERSION, **self._identity(), "counts": list(self._consumed),
                "buffer": [list(s.ref) for s in self.buffer], "good_in_epoch": list(self._good_in_epoch),
                "counters": dict(self._counters), "skipped_by_reason": dict(self._skips),
                "skipped_keys": self._skipped_keys, "pack_stats": dict(vars(self.packer.stats))}

    def load_state_dict(self, state: Dict) -> None:
        state = _upgrade_state(state, [len(s) for s in self.sources])
        expected, saved = self._identity(), {k: state.get(k) for k in self._identity()}
        wrong = {k: (saved[k], v) for k, v in expected.items() if saved[k] != v}
        if wrong:
            raise ValueError("data iterator state does not match this run (saved, current): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in wrong.items()))
        self.pool.reset()
        self._consumed = [int(c) for c in state["counts"]]
        self._submitted = list(self._consumed)
        refs = [tuple(r) for r in state["buffer"]]
        results = self.pool.run_all([(s, self.blend.sample_index(s, d)) for s, d in refs])
        self.buffer = []
        for ref, (result, _) in zip(refs, results):
            if isinstance(result, SampleError):
                raise ShardError(f"resuming: buffered sample at {ref} now fails ({result}); "
                                 "the dataset changed since the checkpoint")
            result.ref = ref
            self.buffer.append(result)
        self._good_in_epoch = [int(g) for g in state["good_in_epoch"]]
        self._counters = Counter(state["counters"])
        self._skips = Counter(state["skipped_by_reason"])
        self._skipped_keys = {k: list(v) for k, v in state.get("skipped_keys", {}).items()}
        for k, v in state["pack_stats"].items():
            setattr(self.packer.stats, k, v)

    def skip_counts(self) -> Dict[str, int]:
        """Samples skipped so far on this rank, by reason (``docs/data.md`` lists the reasons)."""
        return dict(self._skips)

    def stats(self) -> Dict:
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        packed = self.packer.stats
        return {"samples_seen": self._counters["seen"], "samples_skipped": self._counters["skipped"],
                "skipped_by_reason": dict(self._skips), "skipped_keys": dict(self._skipped_keys),
                "epoch": self.blend.locate(0, self._consumed[0])[0],
                "samples_by_source": list(self._consumed),
                "samples_per_s": packed.samples / elapsed if elapsed else 0.0,
                "decode_s_per_sample": self._decode_s / max(1, self._counters["seen"]),
                "wait_s": self._wait_s, "buffered": len(self.buffer), **packed.as_dict()}

    def close(self) -> None:
        """Stop the workers (waits for running jobs). Call at the end of training."""
        self.pool.close()

    def __del__(self):
        try:
            self.pool.close(wait=False)  # never block garbage collection on a running decode
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _upgrade_state(state: Dict, sizes: List[int]) -> Dict:
    """Version 1 (one source, position ``(epoch, i)``) -> version 2 (draw counts per source)."""
    if state.get("version") == STATE_VERSION or state.get("version") != 1 or len(sizes) != 1:
        return state
    from casa_megatron.data.sampler import RankOrder

    length = RankOrder(sizes[0], state["dp_rank"], state["dp_size"], 0).epoch_length()
    draw = lambda e, p: int(e) * length + int(p)  # noqa: E731
    counters = dict(state["counters"])
    return {**state, "version": STATE_VERSION, "sources": [{"num_samples": state["num_samples"], "weight": 1.0}],
            "counts": [draw(state["epoch"], state["position"])],
            "buffer": [[0, draw(e, p)] for e, p in state["buffer"]],
            "good_in_epoch": [counters.pop("good_in_epoch", 0)], "counters": counters}


class SyntheticIterator:
    """The generated colour/side task behind the same interface (resumable, with stats)."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, seed: int):
        self.batches = SyntheticBatches(micro_batch_size, cfg.seq_length, cfg.image_size, seed + dp_rank,
                                        temporal_patch_size=cfg.temporal_patch_size or 1)
        self.cfg, self.b = cfg, micro_batch_size
        self._t0: Optional[float] = None

    def __iter__(self) -> "SyntheticIterator":
        return self

    def __next__(self) -> VLMBatch:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        return next(self.batches)

    def state_dict(self) -> Dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.batches.load_state_dict(state)

    def stats(self) -> Dict:
        per_row = self.batches.per_row
        n = self.batches.batches * self.b * per_row
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        tokens_per_image = (self.cfg.image_size // 28) ** 2
        return {"samples_seen": n, "samples_skipped": 0, "skipped_by_reason": {}, "epoch": 0,
                "batches": self.batches.batches, "packed_samples": n,
                "samples_per_s": n / elapsed if elapsed else 0.0,
                "text_utilization": per_row * SAMPLE_LEN / self.cfg.seq_length,
                "image_utilization": min(1.0, per_row * tokens_per_image / self.cfg.image_seq_length)}

    def skip_counts(self) -> Dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def make_train_iterator(cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                        fusion: str = "casa"):
    """Endless iterator of ``VLMBatch`` for one data-parallel rank.

    ``seed`` fixes the sample order (pass ``cfg.seed`` unless the run mixes in its own);
    ``fusion`` (``model.fusion.mechanism``) decides where consecutive images go: one shared
    window (casa, cross_attention) or each at its own placeholder (insertion). The result has
    ``state_dict()``, ``load_state_dict(d)``, ``stats()``, ``skip_counts()`` and ``close()``.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if cfg.is_synthetic:
        return SyntheticIterator(cfg, micro_batch_size, dp_rank, seed)
    cfg.validate()
    return TrainIterator(cfg, micro_batch_size, dp_rank, dp_size, seed, fusion)


VALID_SEED_OFFSET = 1_000_003  # the synthetic task's validation stream: another seed, same task


def make_eval_iterator(cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       fusion: str = "casa"):
    """Iterator over ``cfg.valid`` from its start, in storage order (no shuffling), so every
    evaluation scores the same samples. Same packing and layout as training."""
    specs = cfg.valid_specs()
    if not specs:
        raise ValueError("data.valid is empty: no validation sources")
    if cfg.is_synthetic:
        return SyntheticIterator(cfg, micro_batch_size, dp_rank, seed + VALID_SEED_OFFSET)
    valid_cfg = dataclasses.replace(cfg, shuffle=False, log_interval=0)
    return TrainIterator(valid_cfg, micro_batch_size, dp_rank, dp_size, seed, fusion, specs)

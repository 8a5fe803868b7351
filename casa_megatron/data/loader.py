"""The training data iterator: ``make_train_iterator(cfg, micro_batch_size, dp_rank, dp_size, seed)``.

Real data flows: sampler (which sample next, per DP rank and epoch) -> ordered worker pool
(read bytes, decode, tokenize: ``processor.py``) -> packing buffer -> first-fit packer ->
``VLMBatch``. The position of the stream is ``(epoch, i)``; the packer's buffer holds samples that
were read but not yet packed. ``state_dict()`` records the position and the buffer's sample
positions (not their pixels), so ``load_state_dict`` re-decodes those few samples and the
resumed run yields exactly the batches an uninterrupted run would have. Prefetched samples are
not state: they are dropped and decoded again.

Bad data: a sample that fails (corrupt/truncated/empty media, missing part, bad annotation,
unsupported codec, too long) is skipped, counted by reason and logged with its key and shard.
A shard with nothing readable fails at start-up (naming it); an epoch in which every sample of
this rank failed, or ``MAX_CONSECUTIVE_FAILURES`` failures in a row, stops the run (a broken
dataset should not spin forever).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

from casa_megatron.data.config import DataConfig
from casa_megatron.data.packing import Packer
from casa_megatron.data.processor import ProcessorSettings, SampleProcessor
from casa_megatron.data.records import SampleError, SampleInfo, ShardError, TokenizedSample
from casa_megatron.data.sampler import RankOrder
from casa_megatron.data.sources import SampleSource, open_source
from casa_megatron.data.synthetic import SAMPLE_LEN, SyntheticBatches
from casa_megatron.data.video import resolve_decoder
from casa_megatron.data.workers import OrderedPool
from casa_megatron.model.batch import VLMBatch

logger = logging.getLogger("casa_megatron.data")
MAX_CONSECUTIVE_FAILURES = 1000
STATE_VERSION = 1


class _LoadSample:
    """Worker job: sample index -> (TokenizedSample | SampleError, seconds). Picklable."""

    def __init__(self, source: SampleSource, processor: SampleProcessor):
        self.source, self.processor = source, processor

    def __call__(self, index: int):
        start = time.perf_counter()
        try:
            out = self.processor(self.source.read(index))
        except SampleError as e:
            out = e
        except Exception as e:  # noqa: BLE001 - a decoder bug on odd input must not stop the run
            out = SampleError("unexpected_error", f"{self.source.key(index)} in "
                              f"{self.source.location(index)}: {type(e).__name__}: {e}")
        return out, time.perf_counter() - start


class TrainIterator:
    """Packed ``VLMBatch`` micro-batches from a shard directory, a .tar or a JSONL manifest."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        self.cfg, self.b, self.seed = cfg, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.source = open_source(cfg.source)
        self.processor = SampleProcessor(ProcessorSettings.from_config(cfg, resolve_decoder(cfg.decoder)))
        self.order = RankOrder(len(self.source), dp_rank, dp_size, seed, cfg.shuffle)
        self.packer = Packer(micro_batch_size, cfg.seq_length, cfg.image_seq_length,
                             self.processor.tokenizer.special.pad, cfg.image_mean, cfg.image_std,
                             temporal_patch_size=cfg.temporal_patch_size or 1, fps=cfg.fps)
        self.pool = OrderedPool(_LoadSample(self.source, self.processor), cfg.num_workers, cfg.worker_type)
        self.prefetch = cfg.prefetch or 4 * max(1, cfg.num_workers)
        self.buffer: List[TokenizedSample] = []
        self.last_batch_samples: List[SampleInfo] = []
        self._consumed = (0, 0)  # next stream position handed to the packer (or skipped)
        self._submitted = (0, 0)  # next stream position sent to the workers
        self._counters: Counter = Counter()  # seen, skipped, good_in_epoch, failures_in_row, ...
        self._skips: Counter = Counter()
        self._reported: set = set()  # sample indices already named in a warning
        self._decode_s = 0.0
        self._wait_s = 0.0
        self._t0: Optional[float] = None

    # --- stream ---------------------------------------------------------------------------------
    def _advance(self, ref: Tuple[int, int]) -> Tuple[int, int]:
        epoch, pos = ref
        return (epoch, pos + 1) if pos + 1 < self.order.epoch_length(epoch) else (epoch + 1, 0)

    def _fill(self) -> None:
        while len(self.pool) < self.prefetch:
            epoch, pos = self._submitted
            self.pool.submit(self.order.sample_at(epoch, pos))
            self._submitted = self._advance(self._submitted)

    def _next_sample(self) -> TokenizedSample:
        while True:
            self._fill()
            result, seconds = self.pool.get()
            ref = self._consumed
            self._consumed = self._advance(ref)
            self._decode_s += seconds
            self._counters["seen"] += 1
            good = not isinstance(result, SampleError)
            if good:
                self._counters["good_in_epoch"] += 1
                self._counters["failures_in_row"] = 0
            else:
                self._skip(ref, result)
            if self._consumed[0] != ref[0]:
                self._end_epoch(ref[0])
            if good:
                result.ref = ref
                return result

    def _skip(self, ref: Tuple[int, int], error: SampleError) -> None:
        index = self.order.sample_at(*ref)
        self._counters["skipped"] += 1
        self._counters["failures_in_row"] += 1
        self._skips[error.reason] += 1
        # Named once (a bad sample fails again every epoch); the totals by reason are logged
        # and tracked by the training loop (training/data_stats.py).
        first = index not in self._reported
        self._reported.add(index)
        logger.log(logging.WARNING if first else logging.DEBUG, "skipped sample %r from %s: %s%s",
                   self.source.key(index), self.source.location(index), error, "" if first else " (again)")
        if self._counters["failures_in_row"] >= MAX_CONSECUTIVE_FAILURES:
            raise ShardError(f"{MAX_CONSECUTIVE_FAILURES} samples in a row failed on dp rank {self.dp_rank} "
                             f"(reasons so far: {dict(self._skips)}); last: {error}")

    def _end_epoch(self, epoch: int) -> None:
        if self._counters["good_in_epoch"] == 0:
            raise ShardError(f"epoch {epoch} on dp rank {self.dp_rank}: none of its "
                             f"{self.order.epoch_length(epoch)} samples of {self.cfg.source} could be used "
                             f"(reasons: {dict(self._skips)})")
        self._counters["good_in_epoch"] = 0
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
                    "skipped %d/%d, waited %.1f s", self.dp_rank, st["batches"], st["samples_per_s"],
                    100 * st["text_utilization"], 100 * st["image_utilization"], st["samples_skipped"],
                    st["samples_seen"], st["wait_s"])

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """JSON-safe position of the stream: enough to continue exactly (same cfg, rank, world)."""
        return {"version": STATE_VERSION, "kind": "shards", "seed": self.seed, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "num_samples": len(self.source),
                "epoch": self._consumed[0], "position": self._consumed[1],
                "buffer": [list(s.ref) for s in self.buffer],
                "counters": dict(self._counters), "skipped_by_reason": dict(self._skips),
                "pack_stats": {k: v for k, v in vars(self.packer.stats).items()}}

    def load_state_dict(self, state: Dict) -> None:
        expected = {"version": STATE_VERSION, "kind": "shards", "seed": self.seed, "dp_rank": self.dp_rank,
                    "dp_size": self.dp_size, "num_samples": len(self.source)}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise ValueError("data iterator state does not match this run (saved, current): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in wrong.items()))
        self.pool.reset()
        self._consumed = self._submitted = (int(state["epoch"]), int(state["position"]))
        refs = [tuple(r) for r in state["buffer"]]
        results = self.pool.run_all([self.order.sample_at(e, p) for e, p in refs])
        self.buffer = []
        for ref, (result, _) in zip(refs, results):
            if isinstance(result, SampleError):
                raise ShardError(f"resuming: buffered sample at {ref} now fails ({result}); "
                                 "the dataset changed since the checkpoint")
            result.ref = ref
            self.buffer.append(result)
        self._counters = Counter(state["counters"])
        self._skips = Counter(state["skipped_by_reason"])
        for k, v in state["pack_stats"].items():
            setattr(self.packer.stats, k, v)

    def stats(self) -> Dict:
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        packed = self.packer.stats
        return {"samples_seen": self._counters["seen"], "samples_skipped": self._counters["skipped"],
                "skipped_by_reason": dict(self._skips), "epoch": self._consumed[0],
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

    def close(self) -> None:
        pass


def make_train_iterator(cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
    """Endless iterator of ``VLMBatch`` for one data-parallel rank.

    ``seed`` fixes the sample order (pass ``cfg.seed`` unless the run mixes in its own); the
    result has ``state_dict()``, ``load_state_dict(d)``, ``stats()`` and ``close()``.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if cfg.is_synthetic:
        return SyntheticIterator(cfg, micro_batch_size, dp_rank, seed)
    cfg.validate()
    return TrainIterator(cfg, micro_batch_size, dp_rank, dp_size, seed)

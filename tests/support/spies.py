"""Spies on what a run reads: the checkpoint files it checksums, the held-out samples it decodes."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Tuple


def counting_checksums(fn: Callable, *args, **kwargs) -> Tuple[object, Dict[str, int]]:
    """(``fn(*args, **kwargs)``, how many times each file was checksummed meanwhile in this process)."""
    from casa_megatron.training import ckpt_manifest

    counts: Counter = Counter()
    original = ckpt_manifest._check_one

    def check_one(path, entry, checksums):
        if checksums and "crc32" in entry:
            counts[str(path)] += 1
        return original(path, entry, checksums)

    ckpt_manifest._check_one = check_one
    try:
        return fn(*args, **kwargs), dict(counts)
    finally:
        ckpt_manifest._check_one = original


def held_out_reads(fn: Callable, *args, **kwargs) -> Tuple[object, List[Tuple[Tuple[int, int], List[int]]]]:
    """(``fn(*args, **kwargs)``, per held-out read in this process: (its share, the indices of
    the samples it gave items for))."""
    from casa_megatron.evaluation import shares

    original, seen = shares.read_items, []

    def read_items(*a, **kw):
        got = original(*a, **kw)
        seen.append((got.part, sorted({q.order for q in got.questions} | {c.order for c in got.captions})))
        return got

    shares.read_items = read_items
    try:
        return fn(*args, **kwargs), seen
    finally:
        shares.read_items = original

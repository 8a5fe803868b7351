"""Counting the full reads of a checkpoint's files (their CRC-32 checks against the manifest)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Tuple


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

"""The megatron-energon side of benchmarks/data_loader.py: a cooker doing our image decode.

Module level (not local) so that energon's worker processes can pickle the samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, basic_sample_keys, stateless

from casa_megatron.data.image_processing import process_image

BUDGET = int(os.environ.get("CASA_BENCH_PIXEL_BUDGET", str(896 * 896)))


@dataclass
class Decoded(Sample):
    pixels: list


@stateless
def cook(sample: dict) -> Decoded:
    """Every ``*.jpg`` part of the sample through the same decode + smart resize as our processor."""
    names = sorted(k for k in sample if k.endswith("jpg"))
    return Decoded(**basic_sample_keys(sample), pixels=[process_image(sample[k], BUDGET, 56 * 56) for k in names])


class Encoder(DefaultTaskEncoder):
    decoder = None  # raw bytes: the cooker decodes, exactly as our processor does
    cookers = [Cooker(cook)]

    def batch(self, samples):
        return samples

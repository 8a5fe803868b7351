"""Shared fixtures. megatron-core is imported once here so forked test workers inherit it."""

import os

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import megatron.core  # noqa: E402,F401  (slow import, done once per session)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def generated_run_data(tmp_path_factory):
    """A small generated dataset with two-image samples and a validation split (training tests)."""
    from casa_megatron.data.synthetic_dataset import make_dataset

    out = tmp_path_factory.mktemp("generated_run")
    make_dataset(out, num_images=24, num_videos=2, seed=2, samples_per_shard=8, progress=False, num_multi=8,
                 valid_fraction=0.25)
    return out

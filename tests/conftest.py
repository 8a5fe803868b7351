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


@pytest.fixture(autouse=True)
def _no_process_group_in_the_test_process(request):
    """The test process must never initialise torch.distributed (megatron's parallel state does,
    e.g. an in-process ``casa-eval --checkpoint``): every worker forked after it crashes
    (SIGSEGV), failing a hundred unrelated tests later in the session. Named at the test that did it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} initialised torch.distributed in the test process; run that part in "
                    "a child (support.dist.run_distributed or a subprocess)")

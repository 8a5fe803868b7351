"""Every fusion variant trained one step at TP=2 and at PP=2, saved as a training checkpoint and
exported with ``casa-convert export-hf``, once per session (support/hf_fixture.py)."""

import pytest
from support.hf_fixture import export_variants


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    return export_variants(tmp_path_factory.mktemp("hf_export"))

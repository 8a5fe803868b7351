"""Every fusion variant exported once per session (megatron built in one forked process)."""

import pytest
from support.hf_fixture import export_variants


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    return export_variants(tmp_path_factory.mktemp("hf_export"))

"""One exported CASA model (parallel placement, from a TP=2 training checkpoint) for the streaming tests."""

import pytest
from support.hf_fixture import export_variants


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    return export_variants(tmp_path_factory.mktemp("hf_export_stream"), ["casa_parallel"], layouts=("tp2",))

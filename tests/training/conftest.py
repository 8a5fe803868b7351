"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def generation_runs(tmp_path_factory):
    """Training runs that answered held-out questions and scored their validation loss
    (``support/generation_runs.py``)."""
    from support.generation_runs import make_runs

    return make_runs(tmp_path_factory.mktemp("generation_eval"))

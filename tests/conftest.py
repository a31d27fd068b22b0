"""Shared test set-up: an isolated cache per test session and small thread counts (2-core CI)."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # pytest-xdist runs one worker per core: one thread each (and in CLI subprocesses) avoids
    # oversubscription, which costs 3-4x on a 2-core machine.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Trained models, features and outlier stores of the tests go to a fresh folder, never ~/.cache."""
    root = tmp_path_factory.mktemp("oodforge-cache")
    old = os.environ.get("OODFORGE_CACHE")
    os.environ["OODFORGE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("OODFORGE_CACHE", None)
    else:
        os.environ["OODFORGE_CACHE"] = old

"""Shared fixtures: the real data in ../shared/data and a persistent decode cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FSBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Decoded arrays are cached across test runs (and across the subprocesses some tests start).
os.environ.setdefault("FSBENCH_CACHE", str(REPO / ".cache-test"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the repository (../shared/data)."""
    if not SHARED_DATA.exists():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set FSBENCH_SHARED_DATA")
    return SHARED_DATA

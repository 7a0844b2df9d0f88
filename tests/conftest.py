"""Shared fixtures: the real data in ../shared/data and a persistent decode cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path:
    """``$FSBENCH_SHARED_DATA``, else ``../shared/data``, else ``$FSBENCH_DATA``."""
    candidates = [
        os.environ.get("FSBENCH_SHARED_DATA"),
        REPO.parent / "shared" / "data",
        os.environ.get("FSBENCH_DATA"),
    ]
    for c in candidates:
        if c and (Path(c) / "omniglot").is_dir():
            return Path(c)
    return Path(candidates[0] or candidates[1])


SHARED_DATA = _find_shared_data()
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Decoded arrays are cached across test runs (and across the subprocesses some tests start).
os.environ.setdefault("FSBENCH_CACHE", str(REPO / ".cache-test"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the repository (../shared/data)."""
    if not SHARED_DATA.exists():
        pytest.fail(
            f"real test data not found (looked in $FSBENCH_SHARED_DATA, {REPO.parent / 'shared' / 'data'} "
            "and $FSBENCH_DATA): point FSBENCH_DATA at a folder holding omniglot/ (and the other "
            "datasets), e.g. one made with `fsbench download omniglot`"
        )
    return SHARED_DATA

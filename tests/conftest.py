"""Shared fixtures: the real test data (found, else downloaded) and a persistent decode cache.

The data root the tests read is the first of ``$FSBENCH_SHARED_DATA``, ``../shared/data``,
``$FSBENCH_DATA``, the default data root (``~/.cache/fewshot-bench/data``) and the test-data
cache (``$FSBENCH_TEST_DATA``, else ``~/.cache/fewshot-bench/test-data``) that holds the
datasets the tests need (``TEST_DATASETS``). When none does, the missing datasets are fetched
with the project's checksummed download into the test-data cache, once; when that fails too,
the tests that need the data fail with a message saying how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_DATA_ENV = "FSBENCH_TEST_DATA"

#: What each dataset the tests read must have under a data root (relative paths).
TEST_DATASETS: dict[str, tuple[str, ...]] = {
    "omniglot": (
        "omniglot/images_background",
        "omniglot/images_evaluation",
        *(f"omniglot/splits/vinyals/{s}.txt" for s in ("train", "val", "test", "trainval")),
    ),
}

# Decoded arrays are cached across test runs (and across the subprocesses some tests start).
os.environ.setdefault("FSBENCH_CACHE", str(REPO / ".cache-test"))


class DataUnavailable(Exception):
    """No candidate folder holds the data and it could not be downloaded."""


def data_cache_dir() -> Path:
    """Where missing test data is downloaded: ``$FSBENCH_TEST_DATA``, else
    ``~/.cache/fewshot-bench/test-data``."""
    env = os.environ.get(TEST_DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache/fewshot-bench/test-data"


def data_candidates() -> list[tuple[str, Path | None]]:
    """``(description, folder or None when unset)`` of every place searched, in order."""
    env = os.environ.get
    return [
        (
            "$FSBENCH_SHARED_DATA",
            Path(env("FSBENCH_SHARED_DATA")) if env("FSBENCH_SHARED_DATA") else None,
        ),
        ("../shared/data", REPO.parent / "shared" / "data"),
        ("$FSBENCH_DATA", Path(env("FSBENCH_DATA")) if env("FSBENCH_DATA") else None),
        ("the default data root", Path.home() / ".cache" / "fewshot-bench" / "data"),
        (f"the test-data cache (${TEST_DATA_ENV})", data_cache_dir()),
    ]


def missing_datasets(folder: Path, names: Iterable[str]) -> list[str]:
    """The datasets of ``names`` whose files (``TEST_DATASETS``) are not all under ``folder``."""
    return [n for n in names if not all((folder / rel).exists() for rel in TEST_DATASETS[n])]


def download_with_fsbench(name: str, root: Path) -> None:
    """Fetch dataset ``name`` into ``root`` with fewshot-bench's checksummed download."""
    from fewshot_bench.data import download_dataset

    download_dataset(name, root)


def provision_data(
    names: Sequence[str],
    candidates: Sequence[tuple[str, Path | None]],
    cache: Path,
    download: Callable[[str, Path], None] = download_with_fsbench,
) -> Path:
    """The first candidate folder that holds every dataset of ``names``; else ``cache`` after
    downloading what it lacks into it. Raises DataUnavailable naming where it looked, why the
    download failed and how to provide the data."""
    for _, folder in candidates:
        if folder is not None and not missing_datasets(folder, names):
            return folder
    errors = []
    for name in missing_datasets(cache, names):
        try:
            download(name, cache)
        except Exception as exc:  # noqa: BLE001 - any failure is reported with the fix below
            first = str(exc).strip().splitlines()
            errors.append(f"{name}: {type(exc).__name__}: {' '.join(x.strip() for x in first[:2])}")
    still = missing_datasets(cache, names)
    if not still:
        return cache
    looked = ", ".join(
        f"{what} ({folder if folder is not None else 'unset'})" for what, folder in candidates
    )
    needs = "; ".join(f"{n} needs {', '.join(TEST_DATASETS[n])}" for n in still)
    failed = "; ".join(errors) or "it ran but the files are still missing"
    commands = " and ".join(f"`fsbench download {n} --data-root DIR`" for n in still)
    python = "; ".join(f"download_dataset({n!r}, 'DIR')" for n in still)
    commands += (
        ' (or `python -c "from fewshot_bench.data import download_dataset; ' + python + '"`)'
    )
    raise DataUnavailable(
        f"real test data for {', '.join(still)} not found; looked in {looked} ({needs}). "
        f"Downloading into {cache} failed: {failed}. Provide it: on a machine with internet run "
        f"{commands}, then set FSBENCH_DATA=DIR (or FSBENCH_SHARED_DATA=DIR, or copy DIR's "
        f"contents to {cache}) before running pytest"
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A data root holding the real datasets the tests read (found or downloaded once)."""
    try:
        return provision_data(tuple(TEST_DATASETS), data_candidates(), data_cache_dir())
    except DataUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, float32 features and labels (``load_digits_features``)."""
    from digits_episodes import load_digits_features

    return load_digits_features()

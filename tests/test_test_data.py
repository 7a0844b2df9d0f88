"""How the tests find their real data: candidate folders first, then the checksummed download
into the test-data cache, then a failure that says how to provide the data."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    TEST_DATASETS,
    DataUnavailable,
    data_cache_dir,
    data_candidates,
    missing_datasets,
    provision_data,
)

from fewshot_bench.data import load_dataset
from fewshot_bench.data.download import RESOURCES, fetch_resources


def _closed_port() -> int:
    """A local TCP port nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_download(name: str, root: Path) -> None:
    """The project's real download (``fetch_resources``: fetch, checksum, extract) of ``name``'s
    files, from a local address that refuses connections: the network error a machine without
    internet gets, in milliseconds."""
    port = _closed_port()
    resources = [
        replace(r, urls=(f"http://127.0.0.1:{port}/{r.filename}",))
        for r in RESOURCES[name].values()
    ]
    fetch_resources(resources, root / name)


def _omniglot_like(folder: Path, real: Path) -> Path:
    """``folder/omniglot`` made of links to the real Omniglot's parts; returns ``folder``."""
    (folder / "omniglot").mkdir(parents=True)
    for part in ("images_background", "images_evaluation", "splits"):
        (folder / "omniglot" / part).symlink_to(real / "omniglot" / part)
    return folder


def test_missing_data_and_failed_download_say_how_to_provide_it(tmp_path: Path) -> None:
    candidates = [
        ("$FSBENCH_SHARED_DATA", None),
        ("../shared/data", tmp_path / "no-shared" / "data"),
        ("$FSBENCH_DATA", tmp_path / "no-data"),
    ]
    cache = tmp_path / "cache"
    start = time.perf_counter()
    with pytest.raises(DataUnavailable) as err:
        provision_data(["omniglot"], candidates, cache, offline_download)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg
    assert "real test data for omniglot not found" in msg
    assert "$FSBENCH_SHARED_DATA (unset)" in msg
    assert f"$FSBENCH_DATA ({tmp_path / 'no-data'})" in msg
    assert "omniglot/images_background" in msg
    # the real error of the project's download, naming the file it could not fetch
    assert (
        f"Downloading into {cache} failed: omniglot: DataNotFoundError: could not download" in msg
    )
    assert "images_background.zip" in msg
    assert "`fsbench download omniglot --data-root DIR`" in msg
    assert "set FSBENCH_DATA=DIR" in msg
    assert not (cache / "omniglot" / "images_background.zip").exists()
    assert not list((cache / "omniglot").glob("*.part"))


def test_a_partial_copy_does_not_count(tmp_path: Path, shared_data: Path) -> None:
    partial = tmp_path / "partial"
    (partial / "omniglot").mkdir(parents=True)
    (partial / "omniglot" / "images_background").symlink_to(
        shared_data / "omniglot" / "images_background"
    )
    assert missing_datasets(partial, ["omniglot"]) == ["omniglot"]
    with pytest.raises(DataUnavailable, match="omniglot/images_evaluation"):
        provision_data(["omniglot"], [("$FSBENCH_DATA", partial)], tmp_path / "c", offline_download)


def test_a_folder_named_by_fsbench_data_is_used(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing anywhere else (no ../shared/data, empty home): the FSBENCH_DATA folder is found
    through the real candidate list, nothing is downloaded, and the tests can load from it."""
    import conftest

    data = _omniglot_like(tmp_path / "mine", shared_data)
    monkeypatch.setattr(conftest, "REPO", tmp_path / "checkout" / "repo")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FSBENCH_SHARED_DATA", raising=False)
    monkeypatch.delenv("FSBENCH_TEST_DATA", raising=False)
    monkeypatch.setenv("FSBENCH_DATA", str(data))
    assert data_cache_dir() == tmp_path / "home" / ".cache" / "fewshot-bench" / "test-data"

    def must_not_download(name: str, root: Path) -> None:
        raise AssertionError(f"downloaded {name} although {data} holds it")

    found = provision_data(
        tuple(TEST_DATASETS), data_candidates(), data_cache_dir(), must_not_download
    )
    assert found == data
    test = load_dataset("omniglot", "test", found)
    assert (test.n_classes, len(test)) == (1692, 1692 * 20)


def test_the_cache_is_used_and_filled_by_the_download(tmp_path: Path, shared_data: Path) -> None:
    """A cache holding the data is used without downloading; an empty one gets what the download
    puts there (here a provider copying the real files) and is then used."""
    calls: list[str] = []

    def copy_in(name: str, root: Path) -> None:
        calls.append(name)
        _omniglot_like(root, shared_data)

    cache = tmp_path / "cache"
    nowhere = [("$FSBENCH_DATA", tmp_path / "none")]
    assert provision_data(["omniglot"], nowhere, cache, copy_in) == cache
    assert calls == ["omniglot"]
    assert provision_data(["omniglot"], nowhere, cache, copy_in) == cache
    assert calls == ["omniglot"]  # not downloaded again

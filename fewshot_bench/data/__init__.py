"""Datasets → images or features + labels + class names, with downloads and checksums.

``load_dataset(name, split, root)`` returns a :class:`LabeledData`. Files are looked up under
``data_root(root)`` (``root``, else ``$FSBENCH_DATA``, else ``~/.cache/fewshot-bench/data``), one
sub-folder per dataset; decoded images are cached under ``cache_root()/decoded``.
``available_datasets()`` lists every dataset, its splits and how to get its files.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from fewshot_bench.data import (  # noqa: F401 (register)
    cifar,
    folder,
    imagenet,
    miniimagenet,
    mnist,
    omniglot,
)
from fewshot_bench.data.base import LabeledData, cache_root, data_root
from fewshot_bench.data.download import download_and_verify, verify_file
from fewshot_bench.data.registry import DatasetInfo, all_infos, check_split, get_info
from fewshot_bench.errors import DataNotFoundError, ProtocolError

_COMMON = ("root", "split", "image_size")


def available_datasets() -> dict[str, DatasetInfo]:
    """Every known dataset by name: splits, description, default image size, how to get it."""
    return all_infos()


def _check_options(info: DatasetInfo, options: dict) -> None:
    params = inspect.signature(info.loader).parameters
    accepted = [p for p in params if p not in _COMMON]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ProtocolError(
            f"{info.name}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    download: bool = False,
    **options: object,
) -> LabeledData:
    """Load one split of a dataset as images ``[N, C, S, S]`` uint8 or features ``[N, D]``.

    ``image_size=None`` uses the dataset's default (``available_datasets()[name].image_size``).
    With ``download=True`` missing files are fetched (and checksum-verified) into the data root.
    Extra ``options`` go to the loader (e.g. ``path=`` for ``imagefolder`` and ``features``).
    Raises ProtocolError (bad name/split/option), DataNotFoundError, InputDataError (corrupt files).
    """
    info = get_info(name)
    check_split(info, split)
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ProtocolError(
            f"{info.name}: image_size must be a positive integer, got {image_size!r}"
        )
    _check_options(info, options)
    base = data_root(root)
    try:
        return info.loader(base, split, image_size, **options)
    except DataNotFoundError:
        if not download or info.downloader is None:
            raise
    info.downloader(base, split)
    return info.loader(base, split, image_size, **options)


def download_dataset(
    name: str, root: str | os.PathLike | None = None, split: str | None = None
) -> Path:
    """Fetch and verify a dataset's files (one split's, or all) into the data root; returns it."""
    info = get_info(name)
    if info.downloader is None:
        raise ProtocolError(f"{info.name} has nothing to download: {info.how_to_get}")
    if split is not None:
        check_split(info, split)
    base = data_root(root)
    info.downloader(base, split or "all")
    return base


__all__ = [
    "DatasetInfo",
    "LabeledData",
    "available_datasets",
    "cache_root",
    "data_root",
    "download_and_verify",
    "download_dataset",
    "load_dataset",
    "verify_file",
]

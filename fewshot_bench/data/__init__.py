"""Datasets → images or features + labels + class names, with downloads and checksums.

``load_dataset(name, split, root)`` returns a :class:`LabeledData`. Files are looked up under
``data_root(root)`` (``root``, else ``$FSBENCH_DATA``, else ``~/.cache/fewshot-bench/data``), one
sub-folder per dataset; decoded images are cached under ``cache_root()/decoded``.
``available_datasets()`` lists every dataset, its splits and how to get its files.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_bench.data.download import download_and_verify, verify_file
from fewshot_bench.data.registry import (
    BUILTIN_MODULES,
    DatasetInfo,
    all_infos,
    check_split,
    get_info,
)
from fewshot_bench.errors import DataNotFoundError, ProtocolError

if TYPE_CHECKING:
    from fewshot_bench.data.base import LabeledData, cache_root, data_root

_COMMON = ("root", "split", "image_size")
#: Names of :mod:`fewshot_bench.data.base` (which imports torch) read on first access, so that
#: importing the package, its registry or its download table stays cheap.
_FROM_BASE = ("LabeledData", "cache_root", "data_root")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("fewshot_bench.data.base"), name)
    if name in BUILTIN_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from fewshot_bench.data.base import data_root

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
    from fewshot_bench.data.base import data_root

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

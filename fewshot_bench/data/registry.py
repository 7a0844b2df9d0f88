"""The table of datasets: what each is, its splits, and the functions that load and download it."""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fewshot_bench.errors import ProtocolError

# loader(root, split, image_size, **options) -> LabeledData ; root is already data_root(root).
Loader = Callable[..., object]
# downloader(root, split) fetches what the split needs into the data root.
Downloader = Callable[[Path, str], None]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, which splits it has, its default image size and how to get its files.

    ``any_split`` datasets (``imagefolder``, ``features``) accept any split their files define;
    ``splits`` then lists the usual ones.
    """

    name: str
    splits: tuple[str, ...]
    description: str
    image_size: int | None
    how_to_get: str
    folder: str | None = None
    any_split: bool = False
    aliases: tuple[str, ...] = ()
    loader: Loader | None = field(default=None, repr=False, compare=False)
    downloader: Downloader | None = field(default=None, repr=False, compare=False)

    @property
    def downloadable(self) -> bool:
        return self.downloader is not None


_REGISTRY: dict[str, DatasetInfo] = {}
_ALIASES: dict[str, str] = {}

#: Modules of the built-in datasets (each registers its own when imported). They are imported
#: on the table's first use, not with the package: their loaders need torch, which a command
#: line that only builds its parser (``fsbench --help``) should not wait seconds for.
BUILTIN_MODULES = ("cifar", "folder", "imagenet", "miniimagenet", "mnist", "omniglot")


@functools.cache
def _load_builtins() -> None:
    # what was registered before the built-ins loaded keeps its name, as if registered after
    earlier, earlier_aliases = dict(_REGISTRY), dict(_ALIASES)
    for module in BUILTIN_MODULES:
        importlib.import_module(f"fewshot_bench.data.{module}")
    _REGISTRY.update(earlier)
    _ALIASES.update(earlier_aliases)


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset to the table (later registrations of the same name replace earlier ones)."""
    _REGISTRY[info.name] = info
    for alias in (info.name, *info.aliases):
        _ALIASES[_norm(alias)] = info.name
    return info


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_info(name: str) -> DatasetInfo:
    """The dataset called ``name`` (case-insensitive; ``_`` and ``-`` alike; aliases accepted)."""
    _load_builtins()
    key = _norm(name)
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    valid = sorted(_REGISTRY)
    close = difflib.get_close_matches(key, list(_ALIASES), n=1)
    hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
    raise ProtocolError(f"unknown dataset {name!r}.{hint} Valid datasets: {', '.join(valid)}")


def check_split(info: DatasetInfo, split: str) -> str:
    """``split`` if the dataset has it, else a ProtocolError listing the valid splits."""
    if split in info.splits or info.any_split:
        return split
    raise ProtocolError(
        f"{info.name} has no split {split!r}; valid splits: {', '.join(info.splits)}"
    )


def all_infos() -> dict[str, DatasetInfo]:
    """Every registered dataset by name, built-in ones included."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))

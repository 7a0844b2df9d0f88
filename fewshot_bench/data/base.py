"""The in-memory form every loader returns, and where loaders look for files."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.errors import DataNotFoundError, InputDataError

DATA_ENV = "FSBENCH_DATA"
CACHE_ENV = "FSBENCH_CACHE"

#: The largest squared L2 norm a feature row may have: a squared distance between two rows (up
#: to 4x the larger squared norm) must still be finite in float32.
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4
#: Bytes of pixels/features hashed at a time by ``LabeledData.fingerprint``.
FINGERPRINT_BLOCK_BYTES = 64 << 20


def feature_problem(features: torch.Tensor, chunk: int = 65536) -> str | None:
    """What makes float features ``[N, D]`` unusable, as a phrase after "they", else ``None``.

    Unusable: NaN or inf entries, or a row whose squared L2 norm exceeds ``MAX_SQUARED_NORM``
    (e.g. values near 3e38: finite in float32, but their squared norms and distances are inf,
    so every distance-based method would score at chance). Reads ``chunk`` rows at a time, so a
    memory-mapped array needs no whole-array temporaries."""
    if features.numel() == 0:
        return None
    flat = features.reshape(len(features), -1)
    bad: list[int] = []
    largest = 0.0
    for start in range(0, len(flat), chunk):
        block = flat[start : start + chunk]
        finite = torch.isfinite(block)
        if not bool(finite.all()):
            rows = (~finite).any(dim=1).nonzero().flatten()[: 5 - len(bad)]
            bad.extend((rows + start).tolist())
            if len(bad) == 5:
                break
        elif not bad:
            largest = max(largest, float(block.abs().max()))
    if bad:
        return f"contain NaN or inf (first bad rows {bad})"
    dim = flat.shape[1]
    if largest * largest * dim <= MAX_SQUARED_NORM:  # bound on every squared norm
        return None
    for start in range(0, len(flat), chunk):
        sq = flat[start : start + chunk].double().pow(2).sum(dim=1)
        over = (sq > MAX_SQUARED_NORM).nonzero().flatten()
        if len(over):
            row = start + int(over[0])
            return (
                f"are too large for float32 arithmetic: row {row} has squared L2 norm "
                f"{float(sq[over[0]]):.3g} (largest |value| {largest:.3g}, {dim} dims), over the "
                f"limit {MAX_SQUARED_NORM:.3g}, so squared distances overflow to inf and every "
                "distance-based score is at chance level"
            )
    return None


def _hash_rows(h: hashlib._Hash, data: torch.Tensor, block_bytes: int) -> None:
    """Feed ``data``'s bytes in C order to ``h``, one contiguous block of rows at a time."""
    if data.numel() == 0:
        return
    row_bytes = data[0].numel() * data.element_size()
    rows = max(1, block_bytes // row_bytes)
    for start in range(0, len(data), rows):
        block = data[start : start + rows].contiguous()  # a view unless data is strided
        h.update(memoryview(block.numpy().reshape(-1).view(np.uint8)))


@dataclass
class LabeledData:
    """One split of a dataset: images *or* features, integer labels and class names.

    ``images`` is a uint8 tensor ``[N, C, H, W]``; ``features`` a float32 tensor ``[N, D]``.
    Exactly one of the two is set. ``labels[i]`` indexes ``class_names``. ``item_ids`` are
    stable per-item keys (usually relative file paths) used to import external episodes.
    """

    name: str
    split: str
    labels: np.ndarray
    class_names: list[str]
    images: torch.Tensor | None = None
    features: torch.Tensor | None = None
    item_ids: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.features is None):
            raise ValueError("LabeledData needs exactly one of images or features")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        data = self.images if self.images is not None else self.features
        if data.shape[0] != n:
            raise InputDataError(
                f"{self.name}/{self.split}: {data.shape[0]} items but {n} labels; "
                "the data files are mismatched or truncated"
            )
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        if self.features is not None:
            if self.features.ndim != 2:
                raise InputDataError(
                    f"{self.name}: features must be 2-D [N, D], got {tuple(self.features.shape)}"
                )
            problem = feature_problem(self.features)
            if problem is not None:
                source = f" ({self.meta['source']})" if "source" in self.meta else ""
                fix = (
                    "recompute the features or drop those rows"
                    if "NaN" in problem
                    else "normalise or rescale the features (e.g. L2-normalise each row, or "
                    "divide by the largest norm) and save them again"
                )
                raise InputDataError(f"{self.name}/{self.split}{source}: features {problem}; {fix}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise InputDataError(
                f"{self.name}/{self.split}: labels outside 0..{len(self.class_names) - 1}"
            )
        if self.item_ids is not None and len(self.item_ids) != n:
            raise ValueError("item_ids must have one entry per item")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def kind(self) -> str:
        """``"images"`` or ``"features"``."""
        return "images" if self.images is not None else "features"

    @property
    def data(self) -> torch.Tensor:
        """The images or the features, whichever this split holds."""
        return self.images if self.images is not None else self.features

    def fingerprint(self) -> str:
        """SHA-256 over class names, labels and pixel/feature bytes: changes when any of them does.

        The bytes are read block by block (no copy of a memory-mapped array); the digest is that
        of the whole C-order byte string."""
        if "fingerprint" not in self.meta:
            h = hashlib.sha256()
            h.update(f"{self.name}|{self.split}|{self.kind}|{tuple(self.data.shape)}".encode())
            h.update("\n".join(self.class_names).encode())
            h.update(self.labels.tobytes())
            _hash_rows(h, self.data, FINGERPRINT_BLOCK_BYTES)
            self.meta["fingerprint"] = h.hexdigest()
        return self.meta["fingerprint"]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_classes)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FSBENCH_DATA``, else ``~/.cache/fewshot-bench/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fewshot-bench" / "data"


def cache_root() -> Path:
    """Where decoded arrays, features and trained states are cached (``$FSBENCH_CACHE``)."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "fewshot-bench" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_path(path: Path, dataset: str, how_to_get: str) -> Path:
    """Return ``path`` if it exists, else raise an error naming the exact path and how to get the data."""
    if not path.exists():
        raise DataNotFoundError(
            f"{dataset}: expected data at {path}, which does not exist.\n"
            f"  How to get it: {how_to_get}\n"
            f"  Or point --data-root / ${DATA_ENV} at a folder that holds it."
        )
    return path

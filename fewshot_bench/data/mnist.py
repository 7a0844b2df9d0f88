"""MNIST and Fashion-MNIST from IDX files (gzip or raw), verified by decoded content."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import resize_images
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.download import RESOURCES, fetch_resources
from fewshot_bench.data.registry import DatasetInfo, Downloader, register
from fewshot_bench.errors import InputDataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_COUNTS = {"train": 60000, "test": 10000}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Decode an IDX file (``.gz`` or raw); InputDataError on bad gzip, magic or length."""
    path = Path(path)
    fix = "delete it and download it again (load_dataset(..., download=True) or fsbench --download)"
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputDataError(f"{path} is not a valid gzip file ({exc}); {fix}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputDataError(
            f"{path} is not an IDX file: magic number {raw[:4].hex() or '(empty)'} "
            f"(expected 0000 then a type code and a dimension count, e.g. 00000803); {fix}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise InputDataError(
            f"{path}: IDX magic {raw[:4].hex()} says {ndim} dimensions, expected {expect_ndim} "
            f"(images and labels swapped, or a different file under this name?); {fix}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputDataError(f"{path}: truncated IDX header; {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputDataError(
            f"{path}: header says {dims} items ({expected} bytes of data) but the file holds "
            f"{len(raw) - header} bytes (truncated or corrupt); {fix}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _find(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_idx(
    name: str,
    folder: str,
    classes: list[str],
    how: str,
    extra: tuple[Path, ...],
    root: Path,
    split: str,
    image_size: int | None,
) -> LabeledData:
    folders = [root / folder, *(root / sub / "raw" for sub in _TORCHVISION_NAMES[name]), *extra]
    pair = None
    for f in folders:  # images and labels must come from the same folder
        found = [_find([f], stem) for stem in _FILES[split]]
        if all(found):
            pair = found
            break
    if pair is None:
        missing = next(s for s in _FILES[split] if _find([root / folder], s) is None)
        other = [s for s in _FILES if s != split and _find(folders, _FILES[s][0])]
        note = f"; only the {other[0]} split's files were found" if other else ""
        looked = ", ".join(str(f) for f in folders[1:])
        require_path(
            root / folder / f"{missing}.gz",
            f"{name} ({split} split{note})",
            f"{how}\n  Also looked in: {looked}",
        )
        raise AssertionError("unreachable")  # pragma: no cover
    img_path, lab_path = pair
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lab_path, expect_ndim=1)
    n = _COUNTS[split]
    fix = "delete it and download it again"
    if images.shape[1:] != (28, 28):
        raise InputDataError(f"{img_path}: images are {images.shape[1:]}, expected 28x28; {fix}")
    for path, count in ((img_path, len(images)), (lab_path, len(labels))):
        if count != n:
            raise InputDataError(
                f"{path}: holds {count} items, the {name} {split} split has {n} "
                f"(truncated or the wrong file); {fix}"
            )
    if labels.min() < 0 or labels.max() > 9:
        raise InputDataError(f"{lab_path}: labels outside 0..9; {fix}")
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1)
    size = image_size or 28
    if size != 28:
        tensor = resize_images(tensor, size)
    return LabeledData(
        name=name,
        split=split,
        labels=labels.astype(np.int64),
        class_names=list(classes),
        images=tensor,
        item_ids=[f"{split}/{i:05d}" for i in range(n)],
        meta={"source": str(img_path.parent), "image_size": size},
    )


_TORCHVISION_NAMES = {"mnist": ("MNIST",), "fashion-mnist": ("FashionMNIST",)}


def _how(name: str, folder: str, extra: str = "") -> str:
    urls = ", ".join(sorted({r.urls[0].rsplit("/", 1)[0] + "/" for r in RESOURCES[name].values()}))
    return (
        f"load_dataset({name!r}, ..., download=True) or `fsbench ... --download` fetches the four "
        f"IDX .gz files from {urls} into <data root>/{folder}/{extra}"
    )


def _downloader(name: str, folder: str) -> Downloader:
    def download(root: Path, split: str) -> None:
        stems = _FILES.get(split, _FILES["train"] + _FILES["test"])
        fetch_resources([RESOURCES[name][s + ".gz"] for s in stems], root / folder)

    return download


def load_mnist(root: Path, split: str, image_size: int | None) -> LabeledData:
    """MNIST digits, [N, 1, 28, 28] uint8 (60000 train / 10000 test)."""
    return _load_idx(
        "mnist", "mnist", MNIST_CLASSES, _how("mnist", "mnist"), (), root, split, image_size
    )


_FASHION_HOW = _how(
    "fashion-mnist",
    "fashion-mnist",
    "; or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) installs them in "
    f"{DEBIAN_FASHION_MNIST}/, which is used when <data root>/fashion-mnist/ is absent",
)


def load_fashion_mnist(root: Path, split: str, image_size: int | None) -> LabeledData:
    """Fashion-MNIST, [N, 1, 28, 28] uint8; falls back to Debian's copy in /usr/share/datasets."""
    return _load_idx(
        "fashion-mnist",
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        _FASHION_HOW,
        (DEBIAN_FASHION_MNIST,),
        root,
        split,
        image_size,
    )


register(
    DatasetInfo(
        name="mnist",
        splits=("train", "test"),
        description="MNIST handwritten digits, 10 classes, 60000 train + 10000 test, 28x28 gray",
        image_size=28,
        how_to_get=_how("mnist", "mnist"),
        folder="mnist",
        loader=load_mnist,
        downloader=_downloader("mnist", "mnist"),
    )
)
register(
    DatasetInfo(
        name="fashion-mnist",
        splits=("train", "test"),
        description="Fashion-MNIST (Zalando), 10 clothing classes, 60000 train + 10000 test, 28x28 gray",
        image_size=28,
        how_to_get=_FASHION_HOW,
        folder="fashion-mnist",
        aliases=("fashionmnist", "fmnist"),
        loader=load_fashion_mnist,
        downloader=_downloader("fashion-mnist", "fashion-mnist"),
    )
)

"""CIFAR-10 (python batches, a JPEG zip copy, or an image folder), CIFAR-100 and CIFAR-FS."""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import (
    cached_array,
    decode_images,
    fingerprint_listing,
    resize_images,
)
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.download import RESOURCES, fetch_resources
from fewshot_bench.data.folder import read_image_folder
from fewshot_bench.data.registry import DatasetInfo, register
from fewshot_bench.errors import InputDataError, ProtocolError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_PY = "cifar-10-batches-py"
CIFAR10_JPEG = "cifar10-jpeg"
CIFAR10_FOLDER = "cifar10"
CIFAR100_PY = "cifar-100-python"
CIFAR_FS_SPLITS = Path("fewshot-splits") / "cifar-fs"
_CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_COUNTS = {"train": 50000, "test": 10000}  # CIFAR-10 and CIFAR-100 alike
JPEG_NOTE = "JPEG q75 copy, not bit-exact CIFAR-10"

CIFAR10_HOW = (
    "load_dataset('cifar10', ..., download=True) or `fsbench ... --download` fetches "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a) "
    f"and unpacks it to <data root>/{CIFAR10_PY}/. Also read: <data root>/{CIFAR10_JPEG}/"
    f"{{train,test}}.zip (entries <split>/<class>/NNNN.jpg) or <data root>/{CIFAR10_FOLDER}/"
    "<split>/<class>/<image>"
)
CIFAR100_HOW = (
    "load_dataset('cifar100', ..., download=True) or `fsbench ... --download` fetches "
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (md5 eb9058c3a382ffc7106e4002c42a8d85) "
    f"and unpacks it to <data root>/{CIFAR100_PY}/"
)
CIFAR_FS_HOW = (
    "download=True fetches the split files from github.com/ArnoutDevos/maml-cifar-fs "
    f"(data/CIFARFS/cifar-fs-splits/) into <data root>/{CIFAR_FS_SPLITS.as_posix()}/; "
    "the images come from CIFAR-100: " + CIFAR100_HOW
)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, never arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise InputDataError(
            f"{path} is not a readable CIFAR python batch ({exc}); delete the folder and "
            "download/unpack the python tarball again (download=True)"
        ) from exc
    if not isinstance(obj, dict):
        raise InputDataError(
            f"{path}: expected a dict in the CIFAR batch, got {type(obj).__name__}"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _strings(values: object) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_batches(
    folder: Path, files: list[str], label_key: str, expected: int | None, how: str, name: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Concatenate CIFAR python batches: images uint8 [N, 3, 32, 32], labels, file names."""
    images, labels, names = [], [], []
    for f in files:
        path = require_path(folder / f, name, how)
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise InputDataError(f"{path}: no 'data' / '{label_key}' entries; not a CIFAR batch")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise InputDataError(
                f"{path}: data {data.shape} with {len(lab)} labels, expected [n, 3072] and n labels; "
                "the file is corrupt, download it again"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
        fn = batch.get("filenames")
        names.extend(_strings(fn) if fn is not None else [f"{f}/{i}" for i in range(len(lab))])
    images_np, labels_np = np.concatenate(images), np.concatenate(labels)
    if expected is not None and len(labels_np) != expected:
        raise InputDataError(
            f"{folder}: {len(labels_np)} images in {files}, expected {expected}; "
            "files are missing or truncated, download the tarball again"
        )
    return images_np, labels_np, names


def _finish(data: LabeledData, size: int) -> LabeledData:
    if size != data.images.shape[-1]:
        data.images = resize_images(data.images, size)
    data.meta["image_size"] = size
    return data


def _cifar10_python(folder: Path, split: str) -> LabeledData:
    meta = folder / "batches.meta"
    classes = _strings(_unpickle(meta)["label_names"]) if meta.exists() else CIFAR10_CLASSES
    images, labels, names = _read_batches(
        folder, _CIFAR10_BATCHES[split], "labels", _COUNTS[split], CIFAR10_HOW, "cifar10"
    )
    return LabeledData(
        name="cifar10",
        split=split,
        labels=labels,
        class_names=classes,
        images=torch.from_numpy(images),
        item_ids=[f"{split}/{n}" for n in names],
        meta={"source": str(folder)},
    )


def _cifar10_jpeg(zip_path: Path, split: str) -> LabeledData:
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputDataError(
            f"{zip_path} is not a readable zip ({exc}); copy it again from its source"
        ) from exc
    with zf:
        infos = [
            i
            for i in zf.infolist()
            if not i.is_dir() and i.filename.lower().endswith((".jpg", ".jpeg", ".png"))
        ]
        index = {c: k for k, c in enumerate(CIFAR10_CLASSES)}
        entries = []
        for info in infos:
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[0] != split or parts[1] not in index:
                raise InputDataError(
                    f"{zip_path}: unexpected entry {info.filename!r}; expected "
                    f"{split}/<class>/<image> with <class> one of {', '.join(CIFAR10_CLASSES)}"
                )
            entries.append((index[parts[1]], parts[2], info))
        if not entries:
            raise InputDataError(f"{zip_path}: no images in the zip")
        entries.sort(key=lambda e: (e[0], e[1]))
        listing = [(e[2].filename, e[2].CRC * 2**32 + e[2].file_size) for e in entries]

        def build() -> np.ndarray:
            sources = [(f"{zip_path}:{e[2].filename}", zf.read(e[2])) for e in entries]
            return decode_images(sources, None, 3, desc=f"cifar10 {split}.zip")

        try:
            arr = cached_array(f"cifar10-jpeg-{split}", fingerprint_listing(listing), build)
        except (zipfile.BadZipFile, zlib.error, OSError) as exc:
            raise InputDataError(f"{zip_path}: cannot read entries ({exc}); copy it again") from exc
    if arr.shape[1:] != (3, 32, 32):
        raise InputDataError(f"{zip_path}: images are {arr.shape[1:]}, expected 3x32x32")
    return LabeledData(
        name="cifar10",
        split=split,
        labels=np.array([e[0] for e in entries], dtype=np.int64),
        class_names=list(CIFAR10_CLASSES),
        images=torch.from_numpy(arr),
        item_ids=[e[2].filename for e in entries],
        meta={"source": str(zip_path), "note": JPEG_NOTE},
    )


def load_cifar10(root: Path, split: str, image_size: int | None) -> LabeledData:
    """CIFAR-10 uint8 [N, 3, 32, 32] from the first form found: python batches, JPEG zip, folder."""
    size = image_size or 32
    if (root / CIFAR10_PY).is_dir():
        return _finish(_cifar10_python(root / CIFAR10_PY, split), size)
    if (root / CIFAR10_JPEG / f"{split}.zip").is_file():
        return _finish(_cifar10_jpeg(root / CIFAR10_JPEG / f"{split}.zip", split), size)
    if (root / CIFAR10_FOLDER / split).is_dir():
        data = read_image_folder(
            root / CIFAR10_FOLDER / split,
            name="cifar10",
            split=split,
            image_size=size,
            channels=3,
            class_order=CIFAR10_CLASSES,
            how_to_get=CIFAR10_HOW,
            id_prefix=f"{split}/",
        )
        return _finish(data, size)
    require_path(root / CIFAR10_PY, "cifar10", CIFAR10_HOW)
    raise AssertionError("unreachable")  # pragma: no cover


def _cifar100_arrays(
    root: Path, split: str, labels: str, name: str = "cifar100", how: str = CIFAR100_HOW
) -> LabeledData:
    if labels not in ("fine", "coarse"):
        raise ProtocolError(f"cifar100: labels must be 'fine' or 'coarse', got {labels!r}")
    folder = require_path(root / CIFAR100_PY, name, how)
    meta = _unpickle(require_path(folder / "meta", name, how))
    classes = _strings(meta[f"{labels}_label_names"])
    images, labs, names = _read_batches(
        folder, [split], f"{labels}_labels", _COUNTS[split], how, name
    )
    data = LabeledData(
        name="cifar100",
        split=split,
        labels=labs,
        class_names=classes,
        images=torch.from_numpy(images),
        item_ids=[f"{split}/{n}" for n in names],
        meta={"source": str(folder), "labels": labels},
    )
    return data


def load_cifar100(
    root: Path, split: str, image_size: int | None, *, labels: str = "fine"
) -> LabeledData:
    """CIFAR-100 uint8 [N, 3, 32, 32] with fine (100) or coarse (20) labels."""
    return _finish(_cifar100_arrays(root, split, labels), image_size or 32)


def cifar_fs_classes(root: Path, split: str) -> list[str]:
    """The CIFAR-100 class names of a CIFAR-FS split, from ``fewshot-splits/cifar-fs/<split>.txt``."""
    path = require_path(root / CIFAR_FS_SPLITS / f"{split}.txt", "cifar-fs", CIFAR_FS_HOW)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputDataError(f"{path}: a class is listed twice; restore the file (download=True)")
    return names


def load_cifar_fs(root: Path, split: str, image_size: int | None) -> LabeledData:
    """CIFAR-FS: CIFAR-100 train+test images (600 per class) of the split's 64/16/20 classes."""
    names = cifar_fs_classes(root, split)
    how = "the images come from CIFAR-100: " + CIFAR100_HOW
    parts = [
        _cifar100_arrays(root, s, "fine", "cifar-fs (CIFAR-100 images)", how)
        for s in ("train", "test")
    ]
    all_names = parts[0].class_names
    unknown = sorted(set(names) - set(all_names))
    if unknown:
        raise InputDataError(
            f"cifar-fs: {root / CIFAR_FS_SPLITS / f'{split}.txt'} names classes not in CIFAR-100: "
            f"{unknown[:5]}; restore the file (download=True)"
        )
    remap = np.full(len(all_names), -1, dtype=np.int64)
    remap[[all_names.index(n) for n in names]] = np.arange(len(names))
    labels = remap[np.concatenate([p.labels for p in parts])]
    keep = np.flatnonzero(labels >= 0)
    keep = keep[np.argsort(labels[keep], kind="stable")]
    images = torch.cat([p.images for p in parts])[torch.from_numpy(keep)]
    ids = [i for p in parts for i in p.item_ids]
    data = LabeledData(
        name="cifar-fs",
        split=split,
        labels=labels[keep],
        class_names=names,
        images=images,
        item_ids=[ids[i] for i in keep.tolist()],
        meta={"source": str(root / CIFAR100_PY)},
    )
    return _finish(data, image_size or 32)


def _download_cifar10(root: Path, split: str) -> None:
    fetch_resources(RESOURCES["cifar10"].values(), root)


def _download_cifar100(root: Path, split: str) -> None:
    fetch_resources(RESOURCES["cifar100"].values(), root)


def _download_cifar_fs(root: Path, split: str) -> None:
    fetch_resources(RESOURCES["cifar-fs"].values(), root / CIFAR_FS_SPLITS)
    if not (root / CIFAR100_PY).is_dir():
        _download_cifar100(root, split)


register(
    DatasetInfo(
        name="cifar10",
        splits=("train", "test"),
        description="CIFAR-10, 10 classes, 50000 train + 10000 test, 32x32 RGB",
        image_size=32,
        how_to_get=CIFAR10_HOW,
        folder=CIFAR10_PY,
        aliases=("cifar-10",),
        loader=load_cifar10,
        downloader=_download_cifar10,
    )
)
register(
    DatasetInfo(
        name="cifar100",
        splits=("train", "test"),
        description="CIFAR-100, 100 fine / 20 coarse classes, 50000 train + 10000 test, 32x32 RGB",
        image_size=32,
        how_to_get=CIFAR100_HOW,
        folder=CIFAR100_PY,
        aliases=("cifar-100",),
        loader=load_cifar100,
        downloader=_download_cifar100,
    )
)
register(
    DatasetInfo(
        name="cifar-fs",
        splits=("train", "val", "test"),
        description=(
            "CIFAR-FS (Bertinetto et al. 2018): CIFAR-100 split into 64/16/20 classes of 600 images"
        ),
        image_size=32,
        how_to_get=CIFAR_FS_HOW,
        folder=CIFAR_FS_SPLITS.as_posix(),
        aliases=("cifarfs",),
        loader=load_cifar_fs,
        downloader=_download_cifar_fs,
    )
)

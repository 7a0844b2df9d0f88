"""miniImageNet with the Ravi & Larochelle class split (64/16/20 classes of 600 images)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import cached_array, decode_images, fingerprint_listing
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.download import RESOURCES, fetch_resources
from fewshot_bench.data.registry import DatasetInfo, register
from fewshot_bench.errors import DataNotFoundError, InputDataError

SPLITS_DIR = Path("fewshot-splits") / "miniimagenet-ravi"
IMAGES_DIR = Path("mini-imagenet") / "images"
HOW_TO_GET = (
    "the split CSVs come with download=True (from github.com/jakesnell/prototypical-networks, "
    f"data/miniImagenet/splits/ravi/) into <data root>/{SPLITS_DIR.as_posix()}/. The images are "
    "ImageNet-derived and cannot be downloaded automatically (ImageNet terms of access): get the "
    "miniImageNet images (e.g. the Ravi & Larochelle release, files like n0153282900000005.jpg) and "
    f"put them in <data root>/{IMAGES_DIR.as_posix()}/"
)


def read_ravi_split(root: Path, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(file names, class names in first-seen order, labels)`` from the Ravi split CSV."""
    path = require_path(root / SPLITS_DIR / f"{split}.csv", "mini-imagenet", HOW_TO_GET)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise InputDataError(
            f"{path}: expected the header 'filename,label', got {rows[0] if rows else 'an empty file'}; "
            "restore the file (download=True fetches it)"
        )
    files, labels_str = [], []
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2:
            raise InputDataError(f"{path}:{lineno}: expected 'filename,label', got {row}")
        files.append(row[0].strip())
        labels_str.append(row[1].strip())
    if len(set(files)) != len(files):
        raise InputDataError(f"{path}: a file name is listed twice; restore the file")
    classes = list(dict.fromkeys(labels_str))
    index = {c: i for i, c in enumerate(classes)}
    return files, classes, np.array([index[c] for c in labels_str], dtype=np.int64)


def load_mini_imagenet(root: Path, split: str, image_size: int | None) -> LabeledData:
    """miniImageNet uint8 [N, 3, S, S] (default S = 84) for the Ravi split's classes."""
    size = image_size or 84
    files, classes, labels = read_ravi_split(root, split)
    folder = require_path(root / IMAGES_DIR, "mini-imagenet", HOW_TO_GET)
    sizes, missing = [], []
    for f in files:
        try:
            sizes.append(os.stat(folder / f).st_size)
        except FileNotFoundError:
            missing.append(f)
    if missing:
        raise DataNotFoundError(
            f"mini-imagenet: {len(missing)} of the {len(files)} images of the {split} split are not "
            f"in {folder} (e.g. {folder / missing[0]}).\n  How to get them: {HOW_TO_GET}"
        )
    order = np.argsort(labels, kind="stable")
    files = [files[i] for i in order]
    labels = labels[order]
    sizes = [sizes[i] for i in order]
    key = f"{size}|{fingerprint_listing(zip(files, sizes, strict=True))}"
    arr = cached_array(
        f"mini-imagenet-{split}-{size}",
        key,
        lambda: decode_images([folder / f for f in files], size, 3, desc=f"mini-imagenet {split}"),
    )
    return LabeledData(
        name="mini-imagenet",
        split=split,
        labels=labels,
        class_names=classes,
        images=torch.from_numpy(arr),
        item_ids=files,
        meta={"source": str(folder), "image_size": size},
    )


def _download(root: Path, split: str) -> None:
    fetch_resources(RESOURCES["mini-imagenet"].values(), root / SPLITS_DIR)


register(
    DatasetInfo(
        name="mini-imagenet",
        splits=("train", "val", "test"),
        description=(
            "miniImageNet (Vinyals et al. 2016), Ravi & Larochelle split: 64/16/20 ImageNet classes "
            "x 600 images, resized to 84x84"
        ),
        image_size=84,
        how_to_get=HOW_TO_GET,
        folder=IMAGES_DIR.as_posix(),
        aliases=("miniimagenet", "mini-imagenet-ravi"),
        loader=load_mini_imagenet,
        downloader=_download,
    )
)

"""Omniglot: Lake's background/evaluation split and the Vinyals split (characters × rotations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import cached_array, decode_images, fingerprint_listing, list_files
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.download import RESOURCES, fetch_resources
from fewshot_bench.data.registry import DatasetInfo, register
from fewshot_bench.errors import DataNotFoundError, InputDataError

FOLDER = "omniglot"
LAKE_SPLITS = {"background": "images_background", "evaluation": "images_evaluation"}
VINYALS_SPLITS = ("train", "val", "test", "trainval")
ROTATIONS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}
HOW_TO_GET = (
    "load_dataset('omniglot', ..., download=True) or `fsbench ... --download` fetches "
    "images_background.zip and images_evaluation.zip from "
    "https://github.com/brendenlake/omniglot/tree/master/python and the Vinyals split files from "
    "github.com/jakesnell/prototypical-networks (data/omniglot/splits/vinyals/) into "
    "<data root>/omniglot/; or unzip those two zips there yourself"
)


def _decoded_folder(base: Path, sub: str, size: int) -> tuple[np.ndarray, list[str]]:
    """All PNGs under ``base/sub`` as uint8 ``[N, 1, S, S]`` (cached) and their relative paths."""
    folder = require_path(base / sub, "omniglot", HOW_TO_GET)
    listing = list_files(folder, (".png",))
    if not listing:
        raise DataNotFoundError(
            f"omniglot: no PNG files under {folder}. How to get it: {HOW_TO_GET}"
        )
    rel = [f"{sub}/{name}" for name, _ in listing]
    key = f"{sub}|{size}|{fingerprint_listing(listing)}"
    arr = cached_array(
        f"omniglot-{sub}-{size}",
        key,
        lambda: decode_images([folder / n for n, _ in listing], size, 1, desc=f"omniglot {sub}"),
    )
    if arr.shape != (len(rel), 1, size, size):  # pragma: no cover - cache key covers this
        raise InputDataError(
            f"omniglot: cached array for {folder} has shape {arr.shape}; delete the cache"
        )
    return arr, rel


def _character(rel_path: str) -> str:
    """``images_background/Alphabet/characterNN/x.png`` -> ``Alphabet/characterNN``."""
    parts = rel_path.split("/")
    if len(parts) != 4:
        raise InputDataError(
            f"omniglot: unexpected file {rel_path}; the layout is "
            "images_background/<Alphabet>/characterNN/<id>_<drawer>.png"
        )
    return f"{parts[1]}/{parts[2]}"


def load_lake(root: Path, split: str, size: int) -> LabeledData:
    """Lake's split: ``background`` (964 characters) or ``evaluation`` (659), 20 drawers each."""
    sub = LAKE_SPLITS[split]
    arr, rel = _decoded_folder(root / FOLDER, sub, size)
    chars = [_character(r) for r in rel]
    class_names, labels = np.unique(np.array(chars), return_inverse=True)
    return LabeledData(
        name="omniglot",
        split=split,
        labels=labels.reshape(-1),
        class_names=class_names.tolist(),
        images=torch.from_numpy(arr),
        item_ids=rel,
        meta={"source": str(root / FOLDER / sub), "image_size": size},
    )


def read_vinyals_split(root: Path, split: str) -> list[tuple[str, int]]:
    """The lines of ``splits/vinyals/<split>.txt`` as (``Alphabet/characterNN``, quarter turns)."""
    path = require_path(
        root / FOLDER / "splits" / "vinyals" / f"{split}.txt", "omniglot", HOW_TO_GET
    )
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        char, _, rot = line.rpartition("/")
        if rot not in ROTATIONS or char.count("/") != 1:
            raise InputDataError(
                f"{path}:{lineno}: {line!r} is not 'Alphabet/characterNN/rotXXX' with XXX in "
                "000/090/180/270; restore the file (download=True fetches it)"
            )
        out.append((char, ROTATIONS[rot]))
    return out


def load_vinyals(root: Path, split: str, size: int) -> LabeledData:
    """Vinyals' split: each class is a character at one rotation (4112/688/1692/4800 classes)."""
    entries = read_vinyals_split(root, split)
    arrays, rels, absent = [], [], []
    for sub in LAKE_SPLITS.values():
        if not (root / FOLDER / sub).is_dir():
            absent.append(sub)
            continue
        arr, rel = _decoded_folder(root / FOLDER, sub, size)
        arrays.append(arr)
        rels.extend(rel)
    if not arrays:
        require_path(root / FOLDER / "images_background", "omniglot", HOW_TO_GET)
    pool = torch.from_numpy(np.concatenate(arrays))
    chars = np.array([_character(r) for r in rels])
    order = np.argsort(chars, kind="stable")
    uniq, starts, counts = np.unique(chars[order], return_index=True, return_counts=True)
    where = {
        c: (s, n) for c, s, n in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True)
    }
    missing = [c for c, _ in entries if c not in where]
    if missing:
        raise DataNotFoundError(
            f"omniglot: {len(missing)} characters of the Vinyals {split} split (e.g. {missing[:3]}) "
            f"have no images under {root / FOLDER}/images_background or images_evaluation"
            + (f" ({', '.join(absent)} is missing)" if absent else "")
            + f".\n  How to get them: {HOW_TO_GET}"
        )
    spans = [where[c] for c, _ in entries]
    src = np.concatenate([order[s : s + n] for s, n in spans])
    labels = np.repeat(np.arange(len(entries)), [n for _, n in spans])
    turns = np.repeat(np.array([k for _, k in entries]), [n for _, n in spans])
    images = pool[torch.from_numpy(src)]
    turns_t = torch.from_numpy(turns)
    for k in (1, 2, 3):
        mask = turns_t == k
        if mask.any():
            images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
    suffix = ["", "#rot090", "#rot180", "#rot270"]
    item_ids = [rels[i] + suffix[k] for i, k in zip(src.tolist(), turns.tolist(), strict=True)]
    names = {v: k for k, v in ROTATIONS.items()}
    return LabeledData(
        name="omniglot",
        split=split,
        labels=labels,
        class_names=[f"{c}/{names[k]}" for c, k in entries],
        images=images,
        item_ids=item_ids,
        meta={"source": str(root / FOLDER), "image_size": size, "rotation": "counter-clockwise"},
    )


def load_omniglot(root: Path, split: str, image_size: int | None) -> LabeledData:
    """Omniglot images uint8 [N, 1, S, S] (white background = 255), default S = 28."""
    size = image_size or 28
    if split in LAKE_SPLITS:
        return load_lake(root, split, size)
    return load_vinyals(root, split, size)


def download_omniglot(root: Path, split: str) -> None:
    """Fetch the image zips (and, for Vinyals splits, the split files) into ``root/omniglot``."""
    res = RESOURCES["omniglot"]
    wanted = [res[sub] for sub in LAKE_SPLITS.values() if not (root / FOLDER / sub).is_dir()]
    if split not in LAKE_SPLITS:
        wanted += [r for k, r in res.items() if k.startswith("splits/")]
    fetch_resources(wanted, root / FOLDER)


register(
    DatasetInfo(
        name="omniglot",
        splits=(*LAKE_SPLITS, *VINYALS_SPLITS),
        description=(
            "Omniglot handwritten characters (Lake et al. 2015), 1623 characters x 20 drawers, 105x105. "
            "background/evaluation: Lake's 964/659-character split; train/val/test/trainval: Vinyals "
            "split with rotations as classes (4112/688/1692/4800 classes)"
        ),
        image_size=28,
        how_to_get=HOW_TO_GET,
        folder=FOLDER,
        loader=load_omniglot,
        downloader=download_omniglot,
    )
)

"""ILSVRC-2012 (ImageNet-1k): the image folder layout, precomputed feature files, and the
class subsets of the low-shot benchmark (Hariharan & Girshick 2017; Douze et al. 2018).

Images: ``<root>/imagenet/train/<wnid>/*.JPEG``; ``<root>/imagenet/val/`` either as
``<wnid>/*.JPEG`` sub-folders or flat (``ILSVRC2012_val_00000001.JPEG`` ...) with Kaggle's
``LOC_val_solution.csv`` or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``;
classes in sorted-wnid order.
Features: ``<root>/imagenet-features/<backbone>/<split>.npy`` (float16/32 ``[N, D]``, memory-mapped)
with ``<split>_labels.npy`` (indices into ``class_names.txt``; without it, 1000 classes named
``class_000`` .. ``class_999``) and optional ``<split>_ids.txt``.
Low-shot subsets (option ``subset=``, e.g. ``lowshot-test-novel``) need the user's copy of the
class split file ``label_idx.json`` of github.com/facebookresearch/low-shot-with-diffusion (not
shipped here: CC-BY-NC), at ``<root>/imagenet/label_idx.json`` (images),
``<root>/imagenet-features/label_idx.json`` (features) or given as ``split_file=PATH``; the
feature route then also needs ``class_names.txt``. Nothing else reads the split file. The subsets
``lowshot-test`` and ``lowshot-val`` expose their class groups ``base`` and ``novel`` in
``meta["class_groups"]``, for the ``[ssl]`` options ``fully_labeled`` and ``query_classes``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import (
    IMAGE_EXTENSIONS,
    cached_array,
    decode_images,
    fingerprint_listing,
    list_files,
    resolve_user_path,
)
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.folder import (
    FLOAT16_MODES,
    _read_strings,
    feature_tensor,
    open_feature_array,
    read_label_array,
)
from fewshot_bench.data.registry import DatasetInfo, register
from fewshot_bench.errors import DataNotFoundError, InputDataError, ProtocolError

IMAGES_DIR = "imagenet"
FEATURES_DIR = "imagenet-features"
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_WNID = re.compile(r"n\d{8}")
_VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)

HOW_TO_GET = (
    "ILSVRC-2012 cannot be downloaded automatically (ImageNet terms of access); get it from "
    f"image-net.org or Kaggle and lay it out as <data root>/{IMAGES_DIR}/train/<wnid>/*.JPEG and "
    f"<data root>/{IMAGES_DIR}/val/ holding either <wnid>/*.JPEG sub-folders or the flat "
    f"ILSVRC2012_val_*.JPEG files plus <data root>/{IMAGES_DIR}/{KAGGLE_SOLUTION} (Kaggle) or "
    f"<data root>/{IMAGES_DIR}/{DEVKIT_DATA.as_posix()}/{{{GROUND_TRUTH}, meta.mat}} (devkit)"
)
#: The low-shot class split file (Hariharan & Girshick 2017, as used by Douze et al. 2018); the
#: user supplies it, in the dataset's folder or via ``split_file=PATH``.
SPLIT_FILE = "label_idx.json"
SPLIT_SOURCE = f"{SPLIT_FILE} of github.com/facebookresearch/low-shot-with-diffusion"
FEATURES_HOW = (
    f"put precomputed features in <data root>/{FEATURES_DIR}/<backbone>/: <split>.npy [N, D] "
    "(float16 or float32), <split>_labels.npy [N] (integer class indices), optionally "
    "<split>_ids.txt (one item id per line) and class_names.txt (the wnid of each class index, "
    "one per line; default: 1000 classes class_000..class_999, which class subsets cannot use); "
    "pass backbone=<name> when there are several backbone folders; for subset=lowshot-* put "
    f"{SPLIT_SOURCE} at <data root>/{FEATURES_DIR}/{SPLIT_FILE}"
)

#: Number of ILSVRC-2012 classes: feature labels index ``class_names.txt``, else these many
#: classes named ``class_000`` .. ``class_999``.
N_CLASSES = 1000

# ----------------------------------------------------------------------------- low-shot split

_SPLIT_LISTS = ("base_classes_1", "base_classes_2", "novel_classes_1", "novel_classes_2")

#: Class subsets of the low-shot benchmark, as the index lists of the split file they join.
#: ``test`` (set 2) is the class set the papers report on; ``val`` (set 1) is for tuning.
SUBSETS: dict[str, tuple[str, ...]] = {
    "lowshot-base": ("base_classes_1", "base_classes_2"),
    "lowshot-test": ("base_classes_2", "novel_classes_2"),
    "lowshot-test-base": ("base_classes_2",),
    "lowshot-test-novel": ("novel_classes_2",),
    "lowshot-val": ("base_classes_1", "novel_classes_1"),
    "lowshot-val-base": ("base_classes_1",),
    "lowshot-val-novel": ("novel_classes_1",),
}
#: The class groups a subset exposes (``LabeledData.meta["class_groups"]``: group name -> class
#: names), for the ``[ssl]`` options ``fully_labeled`` and ``query_classes``.
SUBSET_GROUPS: dict[str, dict[str, str]] = {
    "lowshot-test": {"base": "base_classes_2", "novel": "novel_classes_2"},
    "lowshot-val": {"base": "base_classes_1", "novel": "novel_classes_1"},
}


def split_file_path(root: Path, folder: str, split_file: str | os.PathLike | None) -> Path:
    """Where the split file is looked for: ``split_file`` (as given or under ``root``), else
    ``<root>/<folder>/label_idx.json``."""
    if split_file is not None:
        return resolve_user_path(split_file, root)
    return root / folder / SPLIT_FILE


def read_lowshot_split(path: Path, name: str) -> dict[str, tuple[str, ...]]:
    """The split file's four class lists as wnids (``base_classes_1`` ...), each sorted.

    The file (JSON) holds ``label_names`` (distinct WordNet ids) and the 1-based positions in
    it of ``base_classes_1/2`` and ``novel_classes_1/2`` (193/196/300/311 in the published
    split); the lists must be disjoint and in range. Raises DataNotFoundError / InputDataError
    naming the file, the problem and the fix."""
    get = (
        f"get {SPLIT_SOURCE} (the split of Hariharan & Girshick 2017) and place it at {path}, "
        "or pass the dataset option split_file=PATH"
    )
    if not path.is_file():
        raise DataNotFoundError(
            f"{name}: the subset option needs the low-shot class split file {path}, which does "
            f"not exist; {get}"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputDataError(f"{name}: cannot read {path} as JSON: {exc}; {get}") from exc
    missing = [
        k for k in ("label_names", *_SPLIT_LISTS) if not isinstance(doc, dict) or k not in doc
    ]
    if missing:
        raise InputDataError(
            f"{name}: {path} lacks the key(s) {', '.join(missing)}; expected a JSON object with "
            f"label_names and {', '.join(_SPLIT_LISTS)}; {get}"
        )
    names = doc["label_names"]
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(w, str) and _WNID.fullmatch(w) for w in names)
    ):
        raise InputDataError(
            f"{name}: {path}: label_names must be a non-empty list of WordNet ids (n########); "
            f"{get}"
        )
    if len(set(names)) != len(names):
        dup = sorted({w for w in names if names.count(w) > 1})
        raise InputDataError(
            f"{name}: {path}: label_names repeats {', '.join(dup[:3])} ({len(names)} names, "
            f"{len(set(names))} distinct); {get}"
        )
    lists: dict[str, list[int]] = {}
    for key in _SPLIT_LISTS:
        vals = doc[key]
        if not isinstance(vals, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vals
        ):
            raise InputDataError(
                f"{name}: {path}: {key} must be a list of 1-based positions in label_names; {get}"
            )
        out = sorted(v for v in vals if not 1 <= v <= len(names))
        if out:
            raise InputDataError(
                f"{name}: {path}: {key} has positions {out[:3]} outside 1..{len(names)} "
                f"(the {len(names)} label_names); {get}"
            )
        lists[key] = vals
    seen: dict[int, str] = {}
    for key, vals in lists.items():
        for v in vals:
            if v in seen:
                sizes = ", ".join(f"{k} {len(x)}" for k, x in lists.items())
                where = f"twice in {key}" if seen[v] == key else f"in both {seen[v]} and {key}"
                raise InputDataError(
                    f"{name}: {path}: position {v} ({names[v - 1]}) is {where}; the class "
                    f"lists must be disjoint (sizes: {sizes}; published: 193, 196, 300, 311); "
                    f"{get}"
                )
            seen[v] = key
    return {key: tuple(sorted(names[v - 1] for v in vals)) for key, vals in lists.items()}


def subset_classes(subset: str, split_path: Path, name: str) -> tuple[str, ...]:
    """The wnids of a low-shot class subset (see ``SUBSETS``) per the split file, sorted."""
    return subset_split(subset, split_path, name)[0]


def subset_split(
    subset: str, split_path: Path, name: str
) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """The sorted wnids of a low-shot class subset and its class groups (``SUBSET_GROUPS``:
    e.g. ``base`` and ``novel`` for ``lowshot-test``; none for single-list subsets)."""
    if subset not in SUBSETS:
        raise ProtocolError(
            f"{name}: unknown class subset {subset!r}; valid: {', '.join(SUBSETS)} "
            f"(from the low-shot split file, {SPLIT_SOURCE})"
        )
    lists = read_lowshot_split(split_path, name)
    wanted = tuple(sorted(w for key in SUBSETS[subset] for w in lists[key]))
    groups = {g: list(lists[key]) for g, key in SUBSET_GROUPS.get(subset, {}).items()}
    return wanted, groups


def _check_subset_options(subset: str | None, split_file: object, name: str) -> None:
    """A known subset name, and ``split_file`` only together with a subset."""
    if subset is not None and subset not in SUBSETS:
        subset_classes(subset, Path(), name)  # raises the unknown-subset error
    if split_file is not None and subset is None:
        raise ProtocolError(
            f"{name}: split_file only applies with a class subset; add subset=<one of "
            f"{', '.join(SUBSETS)}> or drop split_file"
        )


def _check_subset_present(
    wanted: tuple[str, ...], present: list[str], where: str, name: str
) -> None:
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise InputDataError(
            f"{name}: {where} lacks {len(missing)} of the {len(wanted)} classes of the subset "
            f"(e.g. {', '.join(missing[:3])}); the low-shot protocols need every class of it: "
            "complete the data or drop the subset option"
        )


# ----------------------------------------------------------------------------- image folders


def _wnid_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _WNID.fullmatch(p.name))


def _class_list(base: Path) -> list[str]:
    """Sorted wnids: the train folder's if there is one, else the val folder's sub-folders."""
    for part in ("train", "val"):
        if (base / part).is_dir() and (found := _wnid_folders(base / part)):
            return found
    return []


def _val_labels_kaggle(path: Path) -> dict[str, str]:
    """Image stem -> wnid from Kaggle's ``LOC_val_solution.csv``."""
    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise InputDataError(
                f"imagenet: {path} should start with the header 'ImageId,PredictionString' "
                "(Kaggle's LOC_val_solution.csv); restore the file"
            )
        for lineno, row in enumerate(rows, 2):
            if not row:
                continue
            words = row[1].split() if len(row) > 1 else []
            if not words or not _WNID.fullmatch(words[0]):
                raise InputDataError(
                    f"imagenet: {path}:{lineno}: expected 'ImageId,<wnid> x y x y ...', got {row}"
                )
            out[row[0].strip()] = words[0]
    return out


def _val_labels_devkit(gt: Path, meta: Path) -> dict[str, str]:
    """Image stem -> wnid from the devkit ground truth (line i: ILSVRC2012_ID of image i)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        id_to_wnid = {
            int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputDataError(
            f"imagenet: cannot read the synsets (ILSVRC2012_ID, WNID) from {meta}: {exc}; "
            "restore meta.mat from ILSVRC2012_devkit_t12.tar.gz"
        ) from exc
    out = {}
    for lineno, line in enumerate(gt.read_text().split(), 1):
        if not line.isdigit() or int(line) not in id_to_wnid:
            raise InputDataError(
                f"imagenet: {gt}:{lineno}: {line!r} is not an ILSVRC2012_ID listed in {meta}"
            )
        out[f"ILSVRC2012_val_{lineno:08d}"] = id_to_wnid[int(line)]
    return out


def _flat_val_labels(base: Path) -> dict[str, str]:
    for folder in (base, base / "val"):
        if (folder / KAGGLE_SOLUTION).is_file():
            return _val_labels_kaggle(folder / KAGGLE_SOLUTION)
    for folder in (base / DEVKIT_DATA, base):
        gt, meta = folder / GROUND_TRUTH, folder / "meta.mat"
        if gt.is_file():
            if not meta.is_file():
                raise DataNotFoundError(
                    f"imagenet: found {gt} but not {meta}, which maps its ILSVRC2012_IDs to "
                    "wnids; extract meta.mat from ILSVRC2012_devkit_t12.tar.gz beside it"
                )
            return _val_labels_devkit(gt, meta)
    raise DataNotFoundError(
        f"imagenet: {base / 'val'} holds flat images but no labels for them: expected "
        f"{base / KAGGLE_SOLUTION} (Kaggle) or {base / DEVKIT_DATA / GROUND_TRUTH} with "
        f"meta.mat beside it (devkit), or sort the images into val/<wnid>/ sub-folders.\n"
        f"  How to get it: {HOW_TO_GET}"
    )


def _listing(base: Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``(relative path, size)`` of the split's images and each one's wnid."""
    folder = require_path(base / split, "imagenet", HOW_TO_GET)
    files = list_files(folder, IMAGE_EXTENSIONS)
    nested = [(n, s) for n, s in files if "/" in n]
    if nested:
        bad = sorted(
            {n.split("/", 1)[0] for n, _ in nested if not _WNID.fullmatch(n.split("/")[0])}
        )
        if bad:
            raise InputDataError(
                f"imagenet: {folder} has sub-folders {bad[:3]} that are not wnids (n########); "
                f"expected {folder}/<wnid>/*.JPEG"
            )
        return nested, [n.split("/", 1)[0] for n, _ in nested]
    if split == "train" or not files:
        raise InputDataError(
            f"imagenet: no images in {folder}; expected {folder}/<wnid>/*.JPEG"
            + ("" if split == "train" else " or flat ILSVRC2012_val_*.JPEG files with their labels")
        )
    labels = _flat_val_labels(base)
    stems = [n.rsplit(".", 1)[0] for n, _ in files]
    unlabeled = [s for s in stems if s not in labels]
    if unlabeled:
        raise InputDataError(
            f"imagenet: {len(unlabeled)} images in {folder} have no label (e.g. {unlabeled[0]}); "
            "the label file does not match these images"
        )
    return files, [labels[s] for s in stems]


def load_imagenet(
    root: Path,
    split: str,
    image_size: int | None,
    *,
    subset: str | None = None,
    split_file: str | os.PathLike | None = None,
    cache: bool = True,
) -> LabeledData:
    """ILSVRC-2012 images uint8 ``[N, 3, S, S]`` (default S = 84), classes in sorted-wnid order.

    ``subset`` keeps only the classes of a low-shot subset (``SUBSETS``), read from the split
    file ``split_file`` (default ``<root>/imagenet/label_idx.json``). Decoded arrays are
    cached; the full train split at 84x84 takes about 27 GB, so use feature files at scale."""
    _check_subset_options(subset, split_file, "imagenet")
    size = image_size or 84
    base = require_path(root / IMAGES_DIR, "imagenet", HOW_TO_GET)
    listing, wnids = _listing(base, split)
    classes = _class_list(base) or sorted(set(wnids))
    unknown = sorted(set(wnids) - set(classes))
    if unknown:
        raise InputDataError(
            f"imagenet: {split} has classes {unknown[:3]} that {base / 'train'} lacks; "
            "train and val must cover the same wnids"
        )
    groups: dict[str, list[str]] = {}
    if subset is not None:
        wanted, groups = subset_split(
            subset, split_file_path(root, IMAGES_DIR, split_file), "imagenet"
        )
        _check_subset_present(wanted, classes, str(base), "imagenet")
        members = set(wanted)
        keep = [i for i, w in enumerate(wnids) if w in members]
        listing, wnids, classes = [listing[i] for i in keep], [wnids[i] for i in keep], list(wanted)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[w] for w in wnids], dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    listing, labels = [listing[i] for i in order], labels[order]
    folder = base / split
    sources = [folder / n for n, _ in listing]

    def build() -> np.ndarray:
        return decode_images(sources, size, 3, desc=f"imagenet {split}")

    key = f"{folder.resolve()}|{size}|{subset}|{fingerprint_listing(listing)}"
    arr = cached_array(f"imagenet-{split}-{size}", key, build) if cache else build()
    return LabeledData(
        name="imagenet",
        split=split,
        labels=labels,
        class_names=classes,
        images=torch.from_numpy(arr),
        item_ids=[f"{split}/{n}" for n, _ in listing],
        meta={"source": str(folder), "image_size": size, "subset": subset}
        | ({"class_groups": groups} if groups else {}),
    )


# ----------------------------------------------------------------------------- feature files


def _backbone_folder(root: Path, backbone: str | None) -> Path:
    base = require_path(root / FEATURES_DIR, "imagenet-features", FEATURES_HOW)
    if backbone is None:
        found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(found) != 1:
            raise ProtocolError(
                f"imagenet-features: {base} holds {len(found)} backbone folders "
                f"({', '.join(found) or 'none'}); pass the option backbone=<one of them>"
            )
        backbone = found[0]
    if not backbone or "/" in backbone or backbone in (".", ".."):
        raise ProtocolError(f"imagenet-features: backbone {backbone!r} is not a folder name")
    return require_path(base / backbone, "imagenet-features", FEATURES_HOW)


def load_imagenet_features(
    root: Path,
    split: str,
    image_size: int | None,
    *,
    backbone: str | None = None,
    subset: str | None = None,
    split_file: str | os.PathLike | None = None,
    float16: str = "convert",
) -> LabeledData:
    """Precomputed ImageNet features ``[N, D]`` of one split, memory-mapped from ``.npy`` files.

    Labels index ``class_names.txt`` if present, else 1000 classes ``class_000`` ..
    ``class_999``. ``subset`` keeps the rows of a low-shot class subset (``SUBSETS``, read from
    ``split_file``, default ``<root>/imagenet-features/label_idx.json``) and renumbers its
    classes in sorted-wnid order; it needs ``class_names.txt`` to know each label's wnid.
    ``float16="keep"`` keeps float16 files float16 (half the memory), else they become float32."""
    _check_subset_options(subset, split_file, "imagenet-features")
    if image_size is not None:
        raise ProtocolError("imagenet-features: image_size does not apply to precomputed features")
    if float16 not in FLOAT16_MODES:
        raise ProtocolError(
            f"imagenet-features: float16 must be one of {', '.join(FLOAT16_MODES)}, got {float16!r}"
        )
    if not split or "/" in split or split.startswith("."):
        raise ProtocolError(f"imagenet-features: split {split!r} is not a file name")
    folder = _backbone_folder(root, backbone)
    file = folder / f"{split}.npy"
    if not file.exists():
        have = sorted(
            p.stem for p in folder.glob("*.npy") if not p.stem.endswith(("_labels", "_ids"))
        )
        raise DataNotFoundError(
            f"imagenet-features: no {file}; splits present in {folder}: {', '.join(have) or 'none'}."
            f"\n  How to get it: {FEATURES_HOW}"
        )
    lab_file = require_path(folder / f"{split}_labels.npy", "imagenet-features", FEATURES_HOW)
    feats = open_feature_array(file, "imagenet-features")
    labels = read_label_array(lab_file, len(feats), "imagenet-features", file)
    names_file = folder / "class_names.txt"
    if names_file.exists():
        classes = _read_strings(names_file)
    else:
        classes = [f"class_{i:03d}" for i in range(N_CLASSES)]
    if labels.dtype.kind not in "iu":
        raise InputDataError(
            f"imagenet-features: {lab_file} holds {labels.dtype} labels; expected integer "
            f"indices into the {len(classes)} class names"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputDataError(
            f"imagenet-features: {lab_file} has labels in {labels.min()}..{labels.max()} but there "
            f"are {len(classes)} classes ({names_file if names_file.exists() else 'class_000..class_999'}); "
            "write class_names.txt (one wnid per class index) beside the features"
        )
    ids = None
    for ids_file in (folder / f"{split}_ids.txt", folder / f"{split}_ids.npy"):
        if ids_file.exists():
            ids = _read_strings(ids_file)
            if len(ids) != len(labels):
                raise InputDataError(
                    f"imagenet-features: {ids_file} has {len(ids)} ids for {len(labels)} rows of "
                    f"{file}; regenerate them together"
                )
            break
    if subset is not None:
        if not names_file.exists():
            raise InputDataError(
                f"imagenet-features: subset={subset!r} needs {names_file} (the wnid of each "
                "label index, one per line) to tell which rows belong to the subset; write it "
                "beside the features (e.g. the 1000 wnids in sorted order if the labels follow "
                "that order, as torchvision's ImageFolder does)"
            )
        split_path = split_file_path(root, FEATURES_DIR, split_file)
        wanted, groups = subset_split(subset, split_path, "imagenet-features")
        _check_subset_present(wanted, classes, str(names_file), "imagenet-features")
        remap = np.full(len(classes), -1, dtype=np.int64)
        position = {w: i for i, w in enumerate(wanted)}
        for i, c in enumerate(classes):
            remap[i] = position.get(c, -1)
        new = remap[labels]
        rows = np.flatnonzero(new >= 0)
        feats, labels, classes = feats[rows], new[rows], list(wanted)
        ids = [ids[i] for i in rows] if ids is not None else None
        row_ids = rows
    else:
        row_ids, groups = np.arange(len(labels)), {}
    return LabeledData(
        name="imagenet-features",
        split=split,
        labels=labels,
        class_names=list(classes),
        features=feature_tensor(feats, name="imagenet-features", source=file, float16=float16),
        item_ids=ids if ids is not None else [f"{split}/{i}" for i in row_ids.tolist()],
        meta={"source": str(file), "subset": subset, "backbone": folder.name}
        | ({"class_groups": groups} if groups else {}),
    )


register(
    DatasetInfo(
        name="imagenet",
        splits=("train", "val"),
        description="ILSVRC-2012 (ImageNet-1k) images, 1000 classes in sorted-wnid order, resized to 84x84",
        image_size=84,
        how_to_get=HOW_TO_GET,
        folder=IMAGES_DIR,
        aliases=("ilsvrc2012", "imagenet-1k"),
        loader=load_imagenet,
    )
)
register(
    DatasetInfo(
        name="imagenet-features",
        splits=("train", "val", "<stem of any <split>.npy>"),
        description="precomputed ILSVRC-2012 features <backbone>/<split>.npy (memory-mapped, float16 ok)",
        image_size=None,
        how_to_get=FEATURES_HOW,
        folder=FEATURES_DIR,
        any_split=True,
        aliases=("imagenet-feats",),
        loader=load_imagenet_features,
    )
)

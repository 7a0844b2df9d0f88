"""Generic loaders: an image folder ``<dir>/<class>/<image>`` and precomputed feature files."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.data._common import (
    cached_array,
    decode_images,
    fingerprint_listing,
    guess_channels,
    list_files,
    resolve_user_path,
)
from fewshot_bench.data.base import LabeledData, require_path
from fewshot_bench.data.registry import DatasetInfo, register
from fewshot_bench.errors import InputDataError, ProtocolError

FOLDER_HOW = "pass path=<dir> where <dir>/<class>/<image> (or <dir>/<split>/<class>/<image>)"
FEATURES_HOW = (
    "pass path=<file.npz> holding arrays 'features' [N, D] and 'labels' [N] (optional "
    "'class_names', 'item_ids'), or path=<features.npy> with labels.npy beside it"
)


def read_image_folder(
    folder: Path,
    *,
    name: str,
    split: str,
    image_size: int | None,
    channels: int | None = None,
    class_order: Sequence[str] | None = None,
    cache: bool = True,
    how_to_get: str = FOLDER_HOW,
    id_prefix: str = "",
) -> LabeledData:
    """Images under ``folder/<class>/...`` as uint8 ``[N, C, S, S]``, ordered by class then path.

    Classes are the sorted sub-folder names, or ``class_order`` (which must name every one).
    """
    require_path(folder, name, how_to_get)
    listing = [(n, s) for n, s in list_files(folder, with_mtime=True) if "/" in n]
    if not listing:
        raise InputDataError(
            f"{name}: no images in class sub-folders of {folder}; expected {folder}/<class>/<image> "
            "with .png/.jpg/... files"
        )
    classes_found = sorted({n.split("/", 1)[0] for n, _ in listing})
    if class_order is None:
        class_names = classes_found
    else:
        class_names = list(class_order)
        extra = sorted(set(classes_found) - set(class_names))
        if extra:
            raise InputDataError(
                f"{name}: {folder} has class folders {extra} not among the expected classes "
                f"{class_names}; remove them or use the generic 'imagefolder' dataset"
            )
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[n.split("/", 1)[0]] for n, _ in listing], dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # listing is sorted by path within each class
    listing = [listing[i] for i in order]
    labels = labels[order]
    if channels is None:
        channels = guess_channels(folder / listing[0][0])
    if channels not in (1, 3):
        raise ProtocolError(f"{name}: channels must be 1 or 3, got {channels!r}")
    sources = [folder / n for n, _ in listing]

    def build() -> np.ndarray:
        return decode_images(sources, image_size, channels, desc=f"{name} {split}")

    if cache:
        key = f"{folder.resolve()}|{image_size}|{channels}|{fingerprint_listing(listing)}"
        arr = cached_array(f"{name}-{split}-{image_size}", key, build)
    else:
        arr = build()
    return LabeledData(
        name=name,
        split=split,
        labels=labels,
        class_names=class_names,
        images=torch.from_numpy(arr),
        item_ids=[id_prefix + n for n, _ in listing],
        meta={"source": str(folder), "image_size": arr.shape[-1], "channels": channels},
    )


def load_imagefolder(
    root: Path,
    split: str,
    image_size: int | None,
    *,
    path: str | os.PathLike | None = None,
    channels: int | None = None,
    cache: bool = True,
) -> LabeledData:
    """Any ``path/<class>/<image>`` tree (split ``"all"``) or ``path/<split>/<class>/<image>``.

    ``image_size=None`` keeps the native size (all images must share it); ``channels`` 1 or 3
    (default: from the first image's mode).
    """
    if path is None:
        raise ProtocolError(f"imagefolder needs the option path=<dir>; {FOLDER_HOW}")
    base = require_path(resolve_user_path(path, root), "imagefolder", FOLDER_HOW)
    if split == "all":
        folder = base
    else:
        if not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ProtocolError(
                f"imagefolder: split {split!r} is not a folder name; a split names one "
                f"sub-folder of {base} (no '/', not '.' or '..'), or 'all' for {base} itself"
            )
        folder = base / split
        if not folder.is_dir():
            subs = sorted(
                p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            raise ProtocolError(
                f"imagefolder: no split folder {folder}; valid splits: all (= {base} itself), "
                + (", ".join(subs) or "(no sub-folders)")
            )
    prefix = "" if split == "all" else f"{split}/"
    return read_image_folder(
        folder,
        name="imagefolder",
        split=split,
        image_size=image_size,
        channels=channels,
        cache=cache,
        id_prefix=prefix,
    )


def _sidecar(folder: Path, stem: str) -> Path | None:
    for ext in (".npy", ".txt"):
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return None


def _read_strings(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()]
    return [str(x) for x in np.load(path, allow_pickle=False).tolist()]


#: How float16 feature files are held: converted to float32 once (default) or kept float16.
FLOAT16_MODES = ("convert", "keep")
#: Rows converted and checked at a time (bounds the extra memory of a conversion).
CHUNK_ROWS = 65536


def open_feature_array(file: Path, name: str) -> np.ndarray:
    """A ``.npy`` feature matrix ``[N, D]``, memory-mapped (copy-on-write: the file is never
    written), checked to hold numbers. Raises InputDataError naming the file and the fix."""
    try:
        arr = np.load(file, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputDataError(
            f"{name}: cannot read {file}: {exc}; rewrite it with numpy.save "
            "(a plain numeric array, no pickled objects)"
        ) from exc
    if arr.dtype.kind not in "fiub" or arr.dtype.itemsize > 8:
        raise InputDataError(
            f"{name}: {file} holds {arr.dtype} features; expected float16, float32 or float64 "
            "(save them with features.astype('float32') or 'float16')"
        )
    if arr.ndim != 2:
        raise InputDataError(
            f"{name}: {file} holds an array of shape {arr.shape}; features must be 2-D [N, D] "
            "(one row per item)"
        )
    return arr


def read_label_array(file: Path, n_rows: int, name: str, features_file: Path) -> np.ndarray:
    """Labels ``[N]`` from a ``.npy`` file, which must have one entry per feature row."""
    try:
        labels = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputDataError(
            f"{name}: cannot read {file}: {exc}; rewrite it with numpy.save (integers, no pickles)"
        ) from exc
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n_rows:
        raise InputDataError(
            f"{name}: {features_file} has {n_rows} feature rows but {file} has {len(labels)} "
            "labels; the files are mismatched or truncated (regenerate them together)"
        )
    return labels


def _bad_rows(chunk: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(chunk).all(axis=1))


def feature_tensor(
    arr: np.ndarray, *, name: str, source: Path | str, float16: str = "convert"
) -> torch.Tensor:
    """``arr`` ``[N, D]`` as a feature tensor, checked block by block for NaN/inf rows.

    float32 arrays are wrapped without a copy (a memory-mapped file stays mapped); float16 arrays
    become float32 (``float16="convert"``) or stay float16 (``"keep"``: half the memory; tasks
    then hold float16); other numeric types become float32. Raises InputDataError naming the
    first bad rows."""
    if float16 not in FLOAT16_MODES:
        raise ProtocolError(
            f"{name}: float16 must be one of {', '.join(FLOAT16_MODES)}, got {float16!r}"
        )
    keep = arr.dtype == np.float32 or (arr.dtype == np.float16 and float16 == "keep")
    out = arr if keep else np.empty(arr.shape, dtype=np.float32)
    for start in range(0, len(arr), CHUNK_ROWS):
        chunk = np.asarray(arr[start : start + CHUNK_ROWS])
        if chunk.dtype.kind == "f":
            bad = _bad_rows(chunk)
            if len(bad):
                rows = (bad[:5] + start).tolist()
                raise InputDataError(
                    f"{name}: features of {source} contain NaN or inf (first bad rows {rows}); "
                    "recompute the features of those items or drop their rows (and labels)"
                )
        if not keep:
            out[start : start + CHUNK_ROWS] = chunk
    if not out.flags.writeable:  # torch wants a writable buffer; a private copy keeps the file
        out = np.array(out)
    return torch.from_numpy(out)


def load_features(
    root: Path,
    split: str,
    image_size: int | None,
    *,
    path: str | os.PathLike | None = None,
    float16: str = "convert",
) -> LabeledData:
    """Precomputed features ``[N, D]`` with labels, from an .npz or a features.npy + labels.npy pair.

    Split ``"all"`` reads ``features``/``labels``; any other split ``s`` reads ``s_features`` /
    ``s_labels`` from the .npz. Without ``class_names`` the distinct labels become the classes.
    A ``.npy`` file is memory-mapped (float32 is used in place); float16 is converted to float32
    block by block, or kept with ``float16="keep"``.
    """
    if path is None:
        raise ProtocolError(f"features needs the option path=<file>; {FEATURES_HOW}")
    if image_size is not None:
        raise ProtocolError("features: image_size does not apply to precomputed features")
    file = require_path(resolve_user_path(path, root), "features", FEATURES_HOW)
    names = item_ids = None
    if file.suffix != ".npz":
        if split != "all":
            raise ProtocolError(f"features: a .npy pair has only the split 'all', not {split!r}")
        lab = require_path(file.parent / "labels.npy", "features", FEATURES_HOW)
        feats = open_feature_array(file, "features")
        labels = read_label_array(lab, len(feats), "features", file)
        try:
            if (cn := _sidecar(file.parent, "class_names")) is not None:
                names = _read_strings(cn)
            if (ids := _sidecar(file.parent, "item_ids")) is not None:
                item_ids = _read_strings(ids)
        except (ValueError, OSError) as exc:
            raise InputDataError(
                f"features: cannot read the class names or item ids beside {file}: {exc}; "
                "write them as text (one per line) or numpy.save a string array"
            ) from exc
    else:
        try:
            z = np.load(file, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise InputDataError(
                    f"features: {file} is a single .npy array, not an .npz archive"
                )
            with z:
                keys = set(z.files)
                pre = "" if split == "all" else f"{split}_"
                if f"{pre}features" not in keys or f"{pre}labels" not in keys:
                    splits = sorted(
                        {k.removesuffix("_features") for k in keys if k.endswith("_features")}
                    )
                    have = (["all"] if "features" in keys else []) + splits
                    raise ProtocolError(
                        f"features: {file} has no arrays '{pre}features' and '{pre}labels' for "
                        f"split {split!r} (arrays: {sorted(keys)}); valid splits: {', '.join(have) or 'none'}"
                    )
                feats, labels = z[f"{pre}features"], z[f"{pre}labels"]
                if "class_names" in keys:
                    names = [str(x) for x in z["class_names"].tolist()]
                if f"{pre}item_ids" in keys:
                    item_ids = [str(x) for x in z[f"{pre}item_ids"].tolist()]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputDataError(
                f"features: cannot read {file}: {exc}; rewrite it with numpy.save / numpy.savez "
                "(plain numeric arrays, no pickled objects)"
            ) from exc
        if feats.dtype.kind not in "fiub":
            raise InputDataError(f"features: {file} holds {feats.dtype} features, expected numbers")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(feats):
            raise InputDataError(
                f"features: {file} has {len(feats)} feature rows but {len(labels)} labels"
            )
    if names is None:
        uniq, labels = np.unique(labels, return_inverse=True)
        names = [str(x) for x in uniq.tolist()]
    elif labels.dtype.kind not in "iu":
        raise InputDataError(
            f"features: {file} has class_names, so labels must be integer indices into them"
        )
    if feats.ndim != 2:
        raise InputDataError(f"features: {file} holds shape {feats.shape}; expected [N, D]")
    return LabeledData(
        name="features",
        split=split,
        labels=labels.reshape(-1),
        class_names=names,
        features=feature_tensor(feats, name="features", source=file, float16=float16),
        item_ids=item_ids if item_ids is not None else [f"{split}/{i}" for i in range(len(labels))],
        meta={"source": str(file)},
    )


register(
    DatasetInfo(
        name="imagefolder",
        splits=("all", "<sub-folder>"),
        description="any folder of images, <path>/<class>/<image> (or <path>/<split>/<class>/<image>)",
        image_size=None,
        how_to_get=FOLDER_HOW,
        any_split=True,
        aliases=("image-folder", "folder"),
        loader=load_imagefolder,
    )
)
register(
    DatasetInfo(
        name="features",
        splits=("all", "<name of s_features in the .npz>"),
        description="precomputed feature vectors [N, D] with labels, from .npz or .npy files",
        image_size=None,
        how_to_get=FEATURES_HOW,
        any_split=True,
        loader=load_features,
    )
)

"""ILSVRC-2012 loaders (folder layouts, feature files), the user's low-shot split file, and the
ImageNet protocols run end to end on a generated tiny tree, generated feature files and generated
split files (no real class split is shipped or needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import run_quietly
from scipy.io import savemat

from fewshot_bench.cli import main
from fewshot_bench.data import load_dataset
from fewshot_bench.data.imagenet import SUBSETS, read_lowshot_split
from fewshot_bench.errors import DataNotFoundError, InputDataError, ProtocolError
from fewshot_bench.run.runner import MethodSpec
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.protocol import builtin_protocol_dir, load_protocol_file

# Four generated wnids; the small split file below makes two test-base, two test-novel classes.
TREE_WNIDS = ["n00000101", "n00000202", "n00000303", "n00000404"]
N_TRAIN, N_VAL = 5, 2
# 1-based positions in label_names: base_1 = extra, base_2 = tree 0 and 1, novel_1 = extra2,
# novel_2 = tree 2 and 3 (label_names deliberately not sorted).
SMALL_NAMES = ["n00000404", "n00000999", "n00000101", "n00000303", "n00000202", "n00000888"]
SMALL_LISTS = {
    "base_classes_1": [2],
    "base_classes_2": [3, 5],
    "novel_classes_1": [6],
    "novel_classes_2": [4, 1],
}
PUBLISHED_SIZES = {
    "base_classes_1": 193,
    "base_classes_2": 196,
    "novel_classes_1": 300,
    "novel_classes_2": 311,
}
#: 1000 generated wnids in sorted order, for the full-size feature files.
WNIDS = [f"n{10000 + 7 * i:08d}" for i in range(1000)]


def _write_split(path: Path, names: list[str], lists: dict[str, list[int]]) -> Path:
    """A label_idx.json with the same keys as the published one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"label_names": names, **lists}))
    return path


def _write_generated_split(path: Path, seed: int = 0) -> Path:
    """A full-size split of WNIDS with the published list sizes, shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    names = [WNIDS[i] for i in rng.permutation(len(WNIDS))]
    positions = (rng.permutation(len(names)) + 1).tolist()
    lists, start = {}, 0
    for key, size in PUBLISHED_SIZES.items():
        lists[key] = positions[start : start + size]
        start += size
    return _write_split(path, names, lists)


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """<root>/imagenet with train/<wnid>/ and a flat val/ (labels not yet written)."""
    root = tmp_path / "data"
    base = root / "imagenet"
    k = 0
    for c, wnid in enumerate(TREE_WNIDS):
        for i in range(N_TRAIN):
            _jpeg(base / "train" / wnid / f"{wnid}_{i}.JPEG", 40 * c + i)
        for _ in range(N_VAL):
            k += 1
            _jpeg(base / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", 40 * c + 20)
    return root


def _val_wnids() -> list[str]:
    return [w for w in TREE_WNIDS for _ in range(N_VAL)]


def _write_kaggle(root: Path) -> None:
    rows = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{k:08d},{w} 1 2 3 4" for k, w in enumerate(_val_wnids(), 1)
    ]
    (root / "imagenet" / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")


def _write_devkit(root: Path, meta: bool = True) -> None:
    data = root / "imagenet" / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = {w: 10 + i for i, w in enumerate(reversed(TREE_WNIDS))}  # not in wnid order
    gt = "\n".join(str(ids[w]) for w in _val_wnids())
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(gt + "\n")
    if meta:
        synsets = np.zeros(len(ids), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        for j, (w, i) in enumerate(ids.items()):
            synsets[j] = (i, w)
        savemat(data / "meta.mat", {"synsets": synsets})


def _sort_val_into_folders(root: Path) -> None:
    val = root / "imagenet" / "val"
    for k, w in enumerate(_val_wnids(), 1):
        (val / w).mkdir(exist_ok=True)
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        shutil.move(val / name, val / w / name)


def test_generated_full_size_split_gives_the_subset_sizes(tmp_path: Path) -> None:
    lists = read_lowshot_split(_write_generated_split(tmp_path / "label_idx.json"), "imagenet")
    assert {k: len(v) for k, v in lists.items()} == PUBLISHED_SIZES
    assert sorted(w for v in lists.values() for w in v) == WNIDS  # disjoint and covering
    assert all(list(v) == sorted(v) for v in lists.values())
    assert set(SUBSETS) == {
        "lowshot-base",
        "lowshot-test",
        "lowshot-test-base",
        "lowshot-test-novel",
        "lowshot-val",
        "lowshot-val-base",
        "lowshot-val-novel",
    }


def test_all_three_val_layouts_give_the_same_labels(tree: Path) -> None:
    train = load_dataset("imagenet", "train", tree, image_size=8)
    assert train.class_names == TREE_WNIDS and train.images.shape == (4 * N_TRAIN, 3, 8, 8)
    assert np.bincount(train.labels).tolist() == [N_TRAIN] * 4
    assert train.item_ids[0] == f"train/{TREE_WNIDS[0]}/{TREE_WNIDS[0]}_0.JPEG"

    with pytest.raises(DataNotFoundError, match="LOC_val_solution.csv"):
        load_dataset("imagenet", "val", tree, image_size=8, cache=False)
    _write_devkit(tree, meta=False)
    with pytest.raises(DataNotFoundError, match="meta.mat"):
        load_dataset("imagenet", "val", tree, image_size=8, cache=False)
    shutil.rmtree(tree / "imagenet" / "ILSVRC2012_devkit_t12")
    _write_devkit(tree)
    devkit = load_dataset("imagenet", "val", tree, image_size=8, cache=False)
    shutil.rmtree(tree / "imagenet" / "ILSVRC2012_devkit_t12")
    _write_kaggle(tree)
    kaggle = load_dataset("imagenet", "val", tree, image_size=8, cache=False)
    (tree / "imagenet" / "LOC_val_solution.csv").unlink()
    _sort_val_into_folders(tree)
    folders = load_dataset("imagenet", "val", tree, image_size=8, cache=False)
    expected = [TREE_WNIDS.index(w) for w in _val_wnids()]
    for val in (devkit, kaggle, folders):
        assert val.class_names == TREE_WNIDS and val.labels.tolist() == expected
        # each val image is a flat colour 40 * class + 20: pixels agree with the labels
        assert (val.images[:, 0, 4, 4].long() // 40).tolist() == expected


def test_image_subsets_from_the_split_file(tree: Path, tmp_path: Path) -> None:
    where = tree / "imagenet" / "label_idx.json"
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("imagenet", "train", tree, image_size=8, subset="lowshot-test-novel")
    msg = str(exc.value)
    assert str(where) in msg and "facebookresearch/low-shot-with-diffusion" in msg
    assert "split_file=PATH" in msg
    _write_split(where, SMALL_NAMES, SMALL_LISTS)
    novel = load_dataset("imagenet", "train", tree, image_size=8, subset="lowshot-test-novel")
    assert novel.class_names == TREE_WNIDS[2:] and len(novel) == 2 * N_TRAIN
    assert np.bincount(novel.labels).tolist() == [N_TRAIN, N_TRAIN]
    assert all(
        i.startswith((f"train/{TREE_WNIDS[2]}/", f"train/{TREE_WNIDS[3]}/")) for i in novel.item_ids
    )
    # pixels follow the classes: train image i of tree class c is the flat colour 40 c + i
    assert (novel.images[:, 0, 4, 4].long() // 40).tolist() == [2] * N_TRAIN + [3] * N_TRAIN
    test = load_dataset("imagenet", "train", tree, image_size=8, subset="lowshot-test")
    assert test.class_names == TREE_WNIDS and len(test) == 4 * N_TRAIN
    # the two-list subsets expose their class groups (for [ssl] fully_labeled / query_classes)
    assert test.meta["class_groups"] == {"base": TREE_WNIDS[:2], "novel": TREE_WNIDS[2:]}
    assert "class_groups" not in novel.meta
    with pytest.raises(InputDataError, match=r"lacks 1 of the 1 classes .*n00000999"):
        load_dataset("imagenet", "train", tree, image_size=8, subset="lowshot-val-base")

    # split_file= elsewhere (absolute, or relative to the data root) overrides the default
    where.unlink()
    other = {**SMALL_LISTS, "novel_classes_2": [4]}
    _write_split(tree / "splits" / "mine.json", SMALL_NAMES, other)
    for given in (tree / "splits" / "mine.json", "splits/mine.json"):
        one = load_dataset(
            "imagenet", "train", tree, image_size=8, subset="lowshot-test-novel", split_file=given
        )
        assert one.class_names == [TREE_WNIDS[2]] and len(one) == N_TRAIN
    with pytest.raises(DataNotFoundError, match="nope.json"):
        load_dataset(
            "imagenet", "train", tree, subset="lowshot-test", split_file=tmp_path / "nope.json"
        )

    # option errors need no split file
    with pytest.raises(ProtocolError, match="valid: lowshot-base"):
        load_dataset("imagenet", "train", tree, image_size=8, subset="novel")
    with pytest.raises(ProtocolError, match="split_file only applies with a class subset"):
        load_dataset("imagenet", "train", tree, image_size=8, split_file="splits/mine.json")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "cannot read .* as JSON"),
        (json.dumps({"label_names": SMALL_NAMES}), "lacks the key.*base_classes_1"),
        (json.dumps([1, 2]), "lacks the key.*label_names"),
        (
            json.dumps({"label_names": ["n00000101", "cat"], **SMALL_LISTS}),
            r"label_names must be a non-empty list of WordNet ids",
        ),
        (
            json.dumps({"label_names": [*SMALL_NAMES[:5], SMALL_NAMES[0]], **SMALL_LISTS}),
            r"label_names repeats n00000404 \(6 names, 5 distinct\)",
        ),
        (
            json.dumps({"label_names": SMALL_NAMES, **SMALL_LISTS, "novel_classes_1": [6, 7, 0]}),
            r"novel_classes_1 has positions \[0, 7\] outside 1\.\.6",
        ),
        (
            json.dumps({"label_names": SMALL_NAMES, **SMALL_LISTS, "novel_classes_1": ["6"]}),
            "novel_classes_1 must be a list of 1-based positions",
        ),
        (
            json.dumps({"label_names": SMALL_NAMES, **SMALL_LISTS, "novel_classes_2": [4, 3]}),
            r"position 3 \(n00000101\) is in both base_classes_2 and novel_classes_2; .*"
            r"sizes: base_classes_1 1, base_classes_2 2, novel_classes_1 1, novel_classes_2 2",
        ),
        (
            json.dumps({"label_names": SMALL_NAMES, **SMALL_LISTS, "base_classes_1": [2, 2]}),
            r"position 2 \(n00000999\) is twice in base_classes_1",
        ),
    ],
)
def test_bad_split_files(tree: Path, content: str, problem: str) -> None:
    where = tree / "imagenet" / "label_idx.json"
    where.write_text(content)
    with pytest.raises(InputDataError, match=problem) as exc:
        load_dataset("imagenet", "train", tree, image_size=8, subset="lowshot-test")
    assert str(where) in str(exc.value) and "low-shot-with-diffusion" in str(exc.value)


def test_image_layout_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"imagenet/train/<wnid>/\*\.JPEG"):
        load_dataset("imagenet", "train", tmp_path / "nowhere")
    _jpeg(tree / "imagenet" / "train" / "cats" / "a.JPEG", 1)
    with pytest.raises(InputDataError, match="not wnids"):
        load_dataset("imagenet", "train", tree, image_size=8, cache=False)


def _write_features(
    folder: Path,
    n_per_class: dict[str, int],
    *,
    classes: list[str] | None = None,
    dtype: type = np.float16,
    dim: int = 16,
    seed: int = 0,
) -> None:
    """<folder>/<split>.npy + _labels.npy + _ids.txt: well-separated Gaussian classes."""
    folder.mkdir(parents=True, exist_ok=True)
    n_classes = len(classes) if classes is not None else len(WNIDS)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * 3
    if classes is not None:
        (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    for split_name, per in n_per_class.items():
        labels = np.repeat(np.arange(n_classes), per)
        feats = means[labels] + 0.1 * rng.normal(size=(len(labels), dim))
        np.save(folder / f"{split_name}.npy", feats.astype(dtype))
        np.save(folder / f"{split_name}_labels.npy", labels)
        ids = [f"{split_name}/{i}.JPEG" for i in range(len(labels))]
        (folder / f"{split_name}_ids.txt").write_text("\n".join(ids) + "\n")


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data (Linux), else None."""
    addr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def test_feature_files_memory_mapped_float16_and_subset(tmp_path: Path) -> None:
    root = tmp_path / "data"
    four = TREE_WNIDS
    _write_features(root / "imagenet-features" / "r50", {"train": 3, "val": 1}, classes=four)
    f16 = load_dataset("imagenet-features", "train", root)
    assert f16.features.dtype == torch.float32 and f16.features.shape == (12, 16)
    assert f16.class_names == four and f16.item_ids[1] == "train/1.JPEG"
    raw = np.load(root / "imagenet-features" / "r50" / "train.npy")
    assert raw.dtype == np.float16 and torch.equal(f16.features, torch.from_numpy(raw).float())
    kept = load_dataset("imagenet-features", "train", root, float16="keep")
    assert kept.features.dtype == torch.float16
    if Path("/proc/self/maps").exists():
        assert _mapped_file(kept.features) == str(root / "imagenet-features" / "r50" / "train.npy")
        assert _mapped_file(f16.features) != _mapped_file(kept.features)  # a converted copy

    # float32 files are used in place, through the mapping; the generic features route too
    _write_features(tmp_path / "f32", {"all": 2}, classes=four, dtype=np.float32)
    (tmp_path / "f32" / "all_labels.npy").rename(tmp_path / "f32" / "labels.npy")
    flat = load_dataset("features", "all", path=tmp_path / "f32" / "all.npy")
    assert flat.features.dtype == torch.float32 and flat.class_names == four
    if Path("/proc/self/maps").exists():
        assert _mapped_file(flat.features) == str(tmp_path / "f32" / "all.npy")
    half = tmp_path / "half"
    half.mkdir()
    np.save(half / "features.npy", np.ones((3, 2), dtype=np.float16))
    np.save(half / "labels.npy", np.array([0, 1, 1]))
    assert (
        load_dataset("features", "all", path=half / "features.npy", float16="keep").features.dtype
        == torch.float16
    )

    # without class_names.txt: 1000 classes named by index, and no subsets
    full = root / "imagenet-features" / "full"
    _write_features(full, {"train": 2})
    with pytest.raises(ProtocolError, match="2 backbone folders"):
        load_dataset("imagenet-features", "train", root)
    plain = load_dataset("imagenet-features", "train", root, backbone="full")
    assert plain.class_names[:2] == ["class_000", "class_001"] and plain.n_classes == 1000
    assert plain.class_names[-1] == "class_999" and len(plain) == 2000
    split_file = _write_generated_split(root / "imagenet-features" / "label_idx.json")
    with pytest.raises(InputDataError, match=r"needs .*full/class_names.txt"):
        load_dataset("imagenet-features", "train", root, backbone="full", subset="lowshot-val")

    # a low-shot subset: rows of its classes only, classes renumbered in sorted-wnid order
    (full / "class_names.txt").write_text("\n".join(WNIDS) + "\n")
    novel = load_dataset(
        "imagenet-features", "train", root, backbone="full", subset="lowshot-test-novel"
    )
    expected = read_lowshot_split(split_file, "test")["novel_classes_2"]
    assert novel.class_names == list(expected) and len(novel) == 2 * 311
    assert np.bincount(novel.labels).tolist() == [2] * 311
    first = WNIDS.index(expected[0])
    assert novel.item_ids[:2] == [f"train/{2 * first}.JPEG", f"train/{2 * first + 1}.JPEG"]
    rows = [WNIDS.index(w) * 2 for w in expected]
    assert torch.equal(novel.features[::2], plain.features[rows])


def test_feature_file_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = root / "imagenet-features" / "r50"
    with pytest.raises(DataNotFoundError, match=r"<backbone>/: <split>.npy"):
        load_dataset("imagenet-features", "train", root)
    _write_features(folder, {"train": 3}, classes=TREE_WNIDS)
    with pytest.raises(DataNotFoundError, match="splits present in .*: train"):
        load_dataset("imagenet-features", "val", root)
    np.save(folder / "train_labels.npy", np.zeros(11, dtype=np.int64))
    with pytest.raises(InputDataError, match="12 feature rows but .* 11 labels"):
        load_dataset("imagenet-features", "train", root)
    np.save(folder / "train_labels.npy", np.arange(12) % 5)
    with pytest.raises(InputDataError, match="class_names.txt"):
        load_dataset("imagenet-features", "train", root)
    np.save(folder / "train_labels.npy", np.arange(12) % 4)
    bad = np.load(folder / "train.npy")
    bad[[7, 9], 3] = np.nan
    np.save(folder / "train.npy", bad)
    with pytest.raises(InputDataError, match=r"NaN or inf \(first bad rows \[7, 9\]\)"):
        load_dataset("imagenet-features", "train", root)
    np.save(folder / "train.npy", bad.astype(np.complex64))
    with pytest.raises(InputDataError, match="complex64 features; expected float16"):
        load_dataset("imagenet-features", "train", root)
    np.save(folder / "train.npy", np.ones(12, dtype=np.float32))
    with pytest.raises(InputDataError, match="must be 2-D"):
        load_dataset("imagenet-features", "train", root)
    with pytest.raises(ProtocolError, match="float16 must be one of convert, keep"):
        load_dataset("imagenet-features", "train", root, float16="half")


def test_feature_protocols_run_end_to_end(tmp_path: Path, capsys) -> None:
    """The built-in SSL family and the low-shot protocol from generated feature files, via the CLI."""
    root, work = tmp_path / "data", tmp_path / "runs"
    _write_features(
        root / "imagenet-features" / "r50", {"train": 100, "val": 5}, classes=TREE_WNIDS
    )
    base = ["--workdir", str(work), "--data-root", str(root), "--quiet"]
    assert main(["run", "imagenet-features-ssl", "-m", "nearest-prototype", *base]) == 0
    df = load_results(work / "results.sqlite")
    assert sorted(df.protocol.unique()) == sorted(
        f"imagenet-features-ssl-{p}pct" for p in (1, 2, 4, 10)
    )
    assert len(df) == 4 * 3 and (df.accuracy > 0.9).all()

    lowshot = root / "imagenet-features" / "r50"
    shutil.rmtree(lowshot)
    _write_features(lowshot, {"train": 3, "val": 1}, classes=WNIDS, dtype=np.float16)
    _write_generated_split(root / "imagenet-features" / "label_idx.json", seed=3)
    run = ["run", "imagenet-lowshot-novel-311", "-m", "nearest-prototype", "--seeds", "1", *base]
    assert main(run) == 0
    rows = load_results(work / "results.sqlite", ["imagenet-lowshot-novel-311"])
    assert len(rows) == 1 and rows.top5.iloc[0] >= rows.accuracy.iloc[0] > 0.9


def test_image_protocol_runs_end_to_end(tree: Path, tmp_path: Path) -> None:
    """An [ssl] protocol on the ImageNet folder layout (flat val + Kaggle labels) gives rows."""
    _write_kaggle(tree)
    text = (builtin_protocol_dir() / "imagenet-ssl.toml").read_text()
    text = text.replace("image_size = 84", "image_size = 8")
    text = text.replace("label_fraction = [0.01, 0.02, 0.04, 0.1]", "label_fraction = [0.2]")
    (tmp_path / "in.toml").write_text(text)
    (proto,) = load_protocol_file(tmp_path / "in.toml")
    assert proto.name == "imagenet-ssl-20pct"
    summaries = run_quietly(proto, [MethodSpec("nearest-prototype")], tmp_path / "w", root=tree)
    assert sum(s.ran for s in summaries) == 3
    df = load_results(tmp_path / "w" / "results.sqlite")
    assert len(df) == 3 and df.accuracy.notna().all()

"""CIFAR-10 (JPEG copy, python batches, image folder), CIFAR-100, CIFAR-FS and miniImageNet splits."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_bench.data import cifar, load_dataset
from fewshot_bench.data.cifar import CIFAR10_CLASSES, cifar_fs_classes
from fewshot_bench.data.miniimagenet import read_ravi_split
from fewshot_bench.errors import DataNotFoundError, InputDataError


@pytest.fixture(scope="module")
def cifar10_jpeg(shared_data: Path) -> dict:
    return {s: load_dataset("cifar10", s, shared_data) for s in ("train", "test")}


def test_cifar10_jpeg_copy(shared_data: Path, cifar10_jpeg: dict) -> None:
    train, test = cifar10_jpeg["train"], cifar10_jpeg["test"]
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 32, 32)
    assert (train.class_counts() == 5000).all() and (test.class_counts() == 1000).all()
    assert train.class_names == CIFAR10_CLASSES
    assert train.meta["note"] == "JPEG q75 copy, not bit-exact CIFAR-10"
    assert test.item_ids[:2] == ["test/airplane/0000.jpg", "test/airplane/0001.jpg"]
    assert train.item_ids[-1] == "train/truck/4999.jpg"
    i = 23456
    name = train.item_ids[i]
    assert name.split("/")[1] == CIFAR10_CLASSES[train.labels[i]]
    with zipfile.ZipFile(shared_data / "cifar10-jpeg" / "train.zip") as zf:
        ref = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
    assert np.array_equal(train.images[i].permute(1, 2, 0).numpy(), ref)


def test_cifar10_resize(shared_data: Path, cifar10_jpeg: dict) -> None:
    d = load_dataset("cifar10", "test", shared_data, image_size=16)
    assert d.images.shape == (10000, 3, 16, 16)


def _batch(n: int, n_classes: int, seed: int, key: bytes = b"labels") -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = (np.arange(n) % n_classes).tolist()
    batch = {
        b"data": data,
        key: labels,
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    return batch, data


def _dump(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar10_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "_COUNTS", {"train": 50, "test": 10})
    folder = tmp_path / "cifar-10-batches-py"
    datas = []
    for i in range(1, 6):
        batch, data = _batch(10, 10, i)
        _dump(batch, folder / f"data_batch_{i}")
        datas.append(data)
    _dump(_batch(10, 10, 9)[0], folder / "test_batch")
    _dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, folder / "batches.meta")
    d = load_dataset("cifar10", "train", tmp_path)
    assert d.images.shape == (50, 3, 32, 32)
    assert np.array_equal(d.images.reshape(50, -1).numpy(), np.concatenate(datas))
    assert d.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert d.class_names == CIFAR10_CLASSES and d.item_ids[0] == "train/img_1_0.png"
    assert "note" not in d.meta
    # a truncated file and a pickle that would run code are both refused
    (folder / "test_batch").write_bytes(pickle.dumps(_batch(10, 10, 9)[0])[:100])
    with pytest.raises(InputDataError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    _dump(Evil(), folder / "test_batch")
    with pytest.raises(InputDataError, match="refusing to load"):
        load_dataset("cifar10", "test", tmp_path)
    monkeypatch.setattr(cifar, "_COUNTS", {"train": 60, "test": 10})
    with pytest.raises(InputDataError, match="expected 60"):
        load_dataset("cifar10", "train", tmp_path)


def test_cifar10_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    for cls in ("truck", "airplane"):
        d = tmp_path / "cifar10" / "test" / cls
        d.mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (32, 32), (k, 0, 0)).save(d / f"{k}.png")
    d = load_dataset("cifar10", "test", tmp_path)
    assert d.labels.tolist() == [0, 0, 0, 9, 9, 9] and d.class_names == CIFAR10_CLASSES
    assert d.item_ids[0] == "test/airplane/0.png"
    (tmp_path / "cifar10" / "test" / "unicorn").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "cifar10" / "test" / "unicorn" / "a.png")
    with pytest.raises(InputDataError, match="unicorn"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("cifar10", "train", tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar10-jpeg" in msg


def test_bad_jpeg_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    z = tmp_path / "cifar10-jpeg" / "test.zip"
    z.parent.mkdir()
    z.write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match="test.zip is not a readable zip"):
        load_dataset("cifar10", "test", tmp_path)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("test/airplane/0000.jpg", b"garbage")
    with pytest.raises(InputDataError, match="cannot decode image .*test/airplane/0000.jpg"):
        load_dataset("cifar10", "test", tmp_path)


def _fake_cifar100(root: Path) -> list[str]:
    names = [f"class{i:02d}" for i in range(100)]
    folder = root / "cifar-100-python"
    _dump({b"fine_label_names": [n.encode() for n in names]}, folder / "meta")
    _dump(_batch(300, 100, 1, b"fine_labels")[0], folder / "train")
    _dump(_batch(100, 100, 2, b"fine_labels")[0], folder / "test")
    return names


def test_cifar100_and_cifar_fs_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "_COUNTS", {"train": 300, "test": 100})
    names = _fake_cifar100(tmp_path)
    d = load_dataset("cifar100", "test", tmp_path)
    assert d.n_classes == 100 and len(d) == 100 and d.class_names == names
    splits = tmp_path / "fewshot-splits" / "cifar-fs"
    splits.mkdir(parents=True)
    (splits / "val.txt").write_text("class07\nclass03\n")
    fs = load_dataset("cifar-fs", "val", tmp_path)
    assert fs.class_names == ["class07", "class03"]
    assert fs.class_counts().tolist() == [4, 4]  # 3 from train + 1 from test each
    assert fs.item_ids[:4] == [
        "train/img_1_7.png",
        "train/img_1_107.png",
        "train/img_1_207.png",
        "test/img_2_7.png",
    ]
    (splits / "test.txt").write_text("class07\nno_such_class\n")
    with pytest.raises(InputDataError, match="no_such_class"):
        load_dataset("cifar-fs", "test", tmp_path)


def test_cifar_fs_split_files(shared_data: Path) -> None:
    splits = {s: cifar_fs_classes(shared_data, s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    union = set().union(*splits.values())
    assert len(union) == 100 and "train" in splits["train"]


def test_cifar_fs_missing_images(shared_data: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("cifar-fs", "train", shared_data)
    msg = str(exc.value)
    assert str(shared_data / "cifar-100-python") in msg and "cifar-100-python.tar.gz" in msg


def test_mini_imagenet_split_files(shared_data: Path) -> None:
    got = {s: read_ravi_split(shared_data, s) for s in ("train", "val", "test")}
    for s, n in (("train", 64), ("val", 16), ("test", 20)):
        files, classes, labels = got[s]
        assert len(classes) == n and len(files) == n * 600
        assert (np.bincount(labels) == 600).all()
    classes = [set(got[s][1]) for s in got]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
    assert got["train"][0][0] == "n0153282900000005.jpg"


def test_mini_imagenet_missing_images(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("mini-imagenet", "test", shared_data)
    msg = str(exc.value)
    assert str(shared_data / "mini-imagenet" / "images") in msg and "ImageNet" in msg


def test_mini_imagenet_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    csvdir = tmp_path / "fewshot-splits" / "miniimagenet-ravi"
    csvdir.mkdir(parents=True)
    rows = ["filename,label", "b1.jpg,nB", "a1.jpg,nA", "b2.jpg,nB", "a2.jpg,nA"]
    (csvdir / "val.csv").write_text("\n".join(rows) + "\n")
    imgs = tmp_path / "mini-imagenet" / "images"
    imgs.mkdir(parents=True)
    for i, f in enumerate(["b1.jpg", "a1.jpg", "b2.jpg"]):
        Image.new("RGB", (100 + i, 90), (i * 50, 0, 0)).save(imgs / f)
    with pytest.raises(DataNotFoundError, match="1 of the 4 images"):
        load_dataset("mini-imagenet", "val", tmp_path)
    Image.new("RGB", (84, 84)).save(imgs / "a2.jpg")
    d = load_dataset("mini-imagenet", "val", tmp_path)
    assert d.images.shape == (4, 3, 84, 84)
    assert d.class_names == ["nB", "nA"] and d.labels.tolist() == [0, 0, 1, 1]
    assert d.item_ids == ["b1.jpg", "b2.jpg", "a1.jpg", "a2.jpg"]
    (csvdir / "test.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(InputDataError, match="header"):
        load_dataset("mini-imagenet", "test", tmp_path)

"""The dataset table, argument errors, imagefolder, features files and verified downloads."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_bench.data import (
    DatasetInfo,
    LabeledData,
    available_datasets,
    base,
    data_root,
    download_and_verify,
    download_dataset,
    load_dataset,
    verify_file,
)
from fewshot_bench.data import download as dl
from fewshot_bench.data.registry import get_info
from fewshot_bench.errors import DataNotFoundError, InputDataError, ProtocolError

NAMES = {
    "omniglot",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "cifar-fs",
    "mini-imagenet",
    "imagefolder",
    "features",
    "imagenet",
    "imagenet-features",
}


def test_available_datasets() -> None:
    infos = available_datasets()
    assert set(infos) == NAMES
    for name, info in infos.items():
        assert isinstance(info, DatasetInfo) and info.name == name
        assert info.splits and info.description and info.how_to_get
    assert infos["omniglot"].image_size == 28 and infos["mini-imagenet"].image_size == 84
    assert infos["omniglot"].splits == (
        "background",
        "evaluation",
        "train",
        "val",
        "test",
        "trainval",
    )
    assert LabeledData is not None


def _old_fingerprint(d: LabeledData) -> str:
    """The whole-array formula that stored manifests were made with."""
    h = hashlib.sha256()
    h.update(f"{d.name}|{d.split}|{d.kind}|{tuple(d.data.shape)}".encode())
    h.update("\n".join(d.class_names).encode())
    h.update(d.labels.tobytes())
    h.update(d.data.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("block_bytes", [1, 40, 100, 64 << 20])
def test_fingerprint_blockwise_equals_whole_array(
    block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "FINGERPRINT_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    labels = np.arange(7) % 3
    feats = torch.randn(7, 5, generator=g)
    images = torch.randint(0, 256, (7, 3, 4, 2), generator=g, dtype=torch.uint8)
    cases = [
        LabeledData("f", "s", labels, ["a", "b", "c"], features=feats),
        LabeledData("f", "s", labels, ["a", "b", "c"], features=feats.half()),
        LabeledData("f", "s", labels, ["a", "b", "c"], features=torch.randn(5, 7, generator=g).t()),
        LabeledData("i", "s", labels, ["a", "b", "c"], images=images),
        LabeledData("i", "s", labels, ["a", "b", "c"], images=images.permute(0, 1, 3, 2)),
        LabeledData("e", "s", labels[:0], ["a"], features=torch.zeros(0, 5)),
        LabeledData("z", "s", labels, ["a", "b", "c"], features=torch.zeros(7, 0)),
    ]
    assert not cases[2].features.is_contiguous() and not cases[4].images.is_contiguous()
    digests = [d.fingerprint() for d in cases]
    assert digests == [_old_fingerprint(d) for d in cases]
    assert len(set(digests)) == len(digests)


def test_feature_problem_blockwise_matches_whole_array() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(50, 4, generator=g)
    assert all(base.feature_problem(feats, chunk=c) is None for c in (1, 7, 65536))
    bad = feats.clone()
    bad[[3, 9, 10, 22, 30, 41, 49], 1] = torch.tensor([float("nan"), float("inf")] * 3 + [0.0])
    bad[49, 2] = -float("inf")
    msgs = {base.feature_problem(bad, chunk=c) for c in (1, 4, 7, 11, 50, 65536)}
    assert msgs == {"contain NaN or inf (first bad rows [3, 9, 10, 22, 30])"}
    few = feats.clone()
    few[[12, 47], 0] = float("nan")
    assert {base.feature_problem(few, chunk=c) for c in (5, 65536)} == {
        "contain NaN or inf (first bad rows [12, 47])"
    }
    huge = feats.clone()
    huge[33] = 3e38
    msgs = {base.feature_problem(huge, chunk=c) for c in (1, 8, 65536)}
    (msg,) = msgs
    assert msg.startswith("are too large for float32 arithmetic: row 33 has squared L2 norm")
    assert "largest |value| 3e+38, 4 dims" in msg
    half = feats.half()
    half[20, 3] = float("nan")
    assert base.feature_problem(half, chunk=3) == "contain NaN or inf (first bad rows [20])"
    assert base.feature_problem(torch.zeros(0, 4)) is None
    assert base.feature_problem(torch.zeros(3, 0)) is None


def test_names_and_aliases() -> None:
    assert get_info("Fashion_MNIST").name == "fashion-mnist"
    assert get_info("CIFAR-10").name == "cifar10"
    with pytest.raises(ProtocolError) as exc:
        load_dataset("omniglott", "train")
    msg = str(exc.value)
    assert "Did you mean 'omniglot'" in msg and "cifar-fs" in msg and "mnist" in msg


def test_bad_split_option_and_size(shared_data: Path) -> None:
    with pytest.raises(ProtocolError, match="valid splits: background, evaluation, train"):
        load_dataset("omniglot", "training", shared_data)
    with pytest.raises(ProtocolError, match="unknown option.*colour.*accepted: labels"):
        load_dataset("cifar100", "train", shared_data, colour=True)
    with pytest.raises(ProtocolError, match="image_size"):
        load_dataset("mnist", "test", shared_data, image_size=0)


def test_missing_data_root_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where = tmp_path / "no" / "such" / "root"
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("mnist", "test", where)
    assert str(where / "mnist" / "t10k-images-idx3-ubyte.gz") in str(exc.value)
    monkeypatch.setenv("FSBENCH_DATA", str(where))
    assert data_root() == where
    with pytest.raises(DataNotFoundError, match=str(where / "omniglot")):
        load_dataset("omniglot", "evaluation")


# ----------------------------------------------------------------------------- imagefolder


def _folder(root: Path, mode: str = "RGB", size: tuple[int, int] = (20, 20)) -> Path:
    for split in ("train", "test"):
        for c, cls in enumerate(("dog", "cat")):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(2 if split == "test" else 3):
                Image.new(mode, size, c * 100 + k if mode == "L" else (c * 100 + k, 0, 0)).save(
                    d / f"{k}.png"
                )
    (root / "README.txt").write_text("not an image")
    return root


def test_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs")
    d = load_dataset("imagefolder", "train", path=root)
    assert d.images.shape == (6, 3, 20, 20)
    assert d.class_names == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.item_ids[0] == "train/cat/0.png"
    assert d.images[0, 0, 0, 0] == 100 and d.images[3, 0, 0, 0] == 0
    every = load_dataset("imagefolder", "all", path=root, image_size=8, channels=1)
    # with split "all" the top-level folders (train/test) are the classes
    assert every.images.shape == (10, 1, 8, 8) and every.class_names == ["test", "train"]
    with pytest.raises(ProtocolError, match="valid splits: all .*test, train"):
        load_dataset("imagefolder", "val", path=root)
    with pytest.raises(ProtocolError, match="path="):
        load_dataset("imagefolder", "all")
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "missing")):
        load_dataset("imagefolder", "all", path=tmp_path / "missing")
    # relative paths are also looked up under the data root
    rel = load_dataset("imagefolder", "test", tmp_path, path="imgs", cache=False)
    assert len(rel) == 4


def test_imagefolder_gray_and_mixed_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "gray", mode="L")
    d = load_dataset("imagefolder", "test", path=root)
    assert d.images.shape == (4, 1, 20, 20)
    Image.new("L", (30, 20)).save(root / "test" / "dog" / "z.png")
    with pytest.raises(InputDataError, match="image_size"):
        load_dataset("imagefolder", "test", path=root)
    assert load_dataset("imagefolder", "test", path=root, image_size=10).images.shape == (
        5,
        1,
        10,
        10,
    )
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputDataError, match="broken.png"):
        load_dataset("imagefolder", "test", path=root, image_size=10)


# ----------------------------------------------------------------------------- features


def test_features_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(12, 5)).astype(np.float64)
    np.savez(
        tmp_path / "f.npz",
        features=f,
        labels=np.arange(12) % 3,
        class_names=np.array(["a", "b", "c"]),
        test_features=f[:4],
        test_labels=np.array([2, 2, 0, 1]),
    )
    d = load_dataset("features", "all", path=tmp_path / "f.npz")
    assert d.kind == "features" and d.features.dtype == torch.float32
    assert d.features.shape == (12, 5) and d.class_names == ["a", "b", "c"]
    assert d.item_ids[:2] == ["all/0", "all/1"]
    t = load_dataset("features", "test", path=tmp_path / "f.npz")
    assert t.labels.tolist() == [2, 2, 0, 1]
    with pytest.raises(ProtocolError, match="valid splits: all, test"):
        load_dataset("features", "val", path=tmp_path / "f.npz")


def test_features_npy_pair_and_label_remap(tmp_path: Path) -> None:
    np.save(tmp_path / "features.npy", np.ones((4, 3), dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.array([10, 30, 10, 20]))
    d = load_dataset("features", "all", path=tmp_path / "features.npy")
    assert d.class_names == ["10", "20", "30"] and d.labels.tolist() == [0, 2, 0, 1]
    (tmp_path / "class_names.txt").write_text("x\ny\nz\n")
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 2]))
    d = load_dataset("features", "all", path=tmp_path / "features.npy")
    assert d.class_names == ["x", "y", "z"]


def test_features_errors(tmp_path: Path) -> None:
    f = np.ones((5, 2))
    f[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", features=f, labels=np.zeros(5, dtype=int))
    with pytest.raises(InputDataError, match=r"NaN or inf \(first bad rows \[3\]\)"):
        load_dataset("features", "all", path=tmp_path / "nan.npz")
    np.savez(tmp_path / "short.npz", features=np.ones((5, 2)), labels=np.zeros(4, dtype=int))
    with pytest.raises(InputDataError, match="5 feature rows but 4 labels"):
        load_dataset("features", "all", path=tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputDataError, match="junk.npz"):
        load_dataset("features", "all", path=tmp_path / "junk.npz")
    np.save(tmp_path / "features.npy", np.ones((3, 2)))
    with pytest.raises(DataNotFoundError, match="labels.npy"):
        load_dataset("features", "all", path=tmp_path / "features.npy")
    with pytest.raises(ProtocolError, match="image_size"):
        load_dataset("features", "all", path=tmp_path / "nan.npz", image_size=32)


# ----------------------------------------------------------------------------- downloads


def _file(tmp_path: Path, data: bytes = b"hello dataset\n" * 1000) -> tuple[Path, str, str]:
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    return p, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def test_verify_file(tmp_path: Path) -> None:
    p, md5, sha = _file(tmp_path)
    assert verify_file(p, md5=md5) == p
    assert verify_file(p, sha256=sha) == p
    with pytest.raises(InputDataError) as exc:
        verify_file(p, md5="0" * 32)
    assert (
        str(p) in str(exc.value) and md5 in str(exc.value) and "download it again" in str(exc.value)
    )
    with pytest.raises(DataNotFoundError):
        verify_file(tmp_path / "nope", md5=md5)


def test_download_and_verify_offline(tmp_path: Path) -> None:
    p, md5, sha = _file(tmp_path)
    dest = tmp_path / "out" / "file.bin"
    missing = (tmp_path / "not-there.bin").as_uri()
    got = download_and_verify([missing, p.as_uri()], dest, md5=md5, progress=False)
    assert got == dest and dest.read_bytes() == p.read_bytes()
    # an existing verified file is kept without fetching (the URL does not even exist)
    assert download_and_verify(missing, dest, sha256=sha, progress=False) == dest
    bad = tmp_path / "bad.bin"
    with pytest.raises(InputDataError, match="expected"):
        download_and_verify(p.as_uri(), bad, md5="f" * 32, progress=False)
    assert not bad.exists() and not (tmp_path / "bad.bin.part").exists()
    with pytest.raises(DataNotFoundError, match="could not download"):
        download_and_verify(missing, tmp_path / "x.bin", md5=md5, progress=False)
    with pytest.raises(ValueError):
        download_and_verify(p.as_uri(), tmp_path / "y.bin")


def test_extract_refuses_escaping_members(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(InputDataError):
        dl.extract_archive(tmp_path / "a.tar.gz", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_load_with_download_uses_the_resource_table(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real MNIST test files are upstream byte for byte: serve them over file:// URLs.
    table = {
        name: dl.Resource(res.filename, ((shared_data / "mnist" / name).as_uri(),), md5=res.md5)
        for name, res in dl.RESOURCES["mnist"].items()
        if name.startswith("t10k")
    }
    monkeypatch.setitem(dl.RESOURCES, "mnist", table)
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError):
        load_dataset("mnist", "test", root)
    d = load_dataset("mnist", "test", root, download=True)
    assert len(d) == 10000 and (root / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    with pytest.raises(ProtocolError, match="nothing to download"):
        download_dataset("features", root)


def test_download_of_archives_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("images_background/Alpha/character01/0001_01.png", b"x")
    src = tmp_path / "images_background.zip"
    src.write_bytes(buf.getvalue())
    res = dl.Resource(src.name, (src.as_uri(),), sha256=dl.file_digest(src), extract=True)
    dl.fetch_resources([res], tmp_path / "root" / "omniglot")
    assert (tmp_path / "root/omniglot/images_background/Alpha/character01/0001_01.png").exists()


def test_resource_table_checksums(shared_data: Path) -> None:
    for files in dl.RESOURCES.values():
        for res in files.values():
            assert res.urls and all(u.startswith(("https://", "http://")) for u in res.urls)
            assert (res.md5 and len(res.md5) == 32) or (res.sha256 and len(res.sha256) == 64)
    # the split files and MNIST test files we hold are the upstream files: digests must agree
    local = {
        ("omniglot", "splits/vinyals/train.txt"): shared_data / "omniglot/splits/vinyals/train.txt",
        ("cifar-fs", "test.txt"): shared_data / "fewshot-splits/cifar-fs/test.txt",
        ("mini-imagenet", "val.csv"): shared_data / "fewshot-splits/miniimagenet-ravi/val.csv",
        ("mnist", "t10k-labels-idx1-ubyte.gz"): shared_data / "mnist/t10k-labels-idx1-ubyte.gz",
    }
    for (ds, key), path in local.items():
        res = dl.RESOURCES[ds][key]
        verify_file(path, md5=res.md5, sha256=res.sha256)
    assert (
        dl.RESOURCES["cifar10"]["cifar-10-python.tar.gz"].md5 == "c58f30108f718f92721af3b95e74349a"
    )
    assert (
        dl.RESOURCES["cifar100"]["cifar-100-python.tar.gz"].md5
        == "eb9058c3a382ffc7106e4002c42a8d85"
    )

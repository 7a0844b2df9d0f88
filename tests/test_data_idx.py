"""MNIST / Fashion-MNIST IDX loading on the real files, and the errors for corrupt IDX files."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_bench.data import load_dataset
from fewshot_bench.data.mnist import FASHION_MNIST_CLASSES, read_idx
from fewshot_bench.errors import DataNotFoundError, InputDataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="apt-get install dataset-fashion-mnist"
)


@needs_fashion
def test_fashion_mnist_from_debian(tmp_path: Path) -> None:
    # an empty data root: the loader falls back to /usr/share/datasets/fashion-mnist
    train = load_dataset("fashion-mnist", "train", tmp_path)
    test = load_dataset("fashion-mnist", "test", tmp_path)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert (train.class_counts() == 6000).all() and (test.class_counts() == 1000).all()
    assert train.class_names == FASHION_MNIST_CLASSES
    assert train.meta["source"] == str(FASHION)
    assert train.item_ids[:2] == ["train/00000", "train/00001"]


def test_mnist_test_split(shared_data: Path) -> None:
    d = load_dataset("mnist", "test", shared_data)
    assert d.images.shape == (10000, 1, 28, 28)
    assert d.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert d.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert d.class_names == [str(i) for i in range(10)]
    assert int(d.images.max()) == 255 and float(d.images.float().mean()) < 60  # black background


def test_mnist_resize(shared_data: Path) -> None:
    d = load_dataset("mnist", "test", shared_data, image_size=32)
    assert d.images.shape == (10000, 1, 32, 32) and d.images.dtype == torch.uint8


def test_mnist_missing_train_split_says_so(shared_data: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("mnist", "train", shared_data)
    msg = str(exc.value)
    assert str(shared_data / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "only the test split" in msg and "download=True" in msg


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_mnist(folder: Path, n: int = 10000, corrupt: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))


def test_raw_idx_files_are_read(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist")
    for f in (tmp_path / "mnist").glob("*.gz"):
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    d = load_dataset("mnist", "test", tmp_path)
    assert len(d) == 10000
    assert np.array_equal(read_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte"), d.labels)


def test_truncated_gzip(tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    src = shared_data / "mnist" / "t10k-images-idx3-ubyte.gz"
    (folder / src.name).write_bytes(src.read_bytes()[:50000])
    shutil.copy(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", folder)
    with pytest.raises(InputDataError) as exc:
        load_dataset("mnist", "test", tmp_path)
    msg = str(exc.value)
    assert str(folder / src.name) in msg and "gzip" in msg and "download" in msg


def test_wrong_magic(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04xxxx"))
    with pytest.raises(InputDataError, match="t10k-labels-idx1-ubyte.gz is not an IDX file"):
        load_dataset("mnist", "test", tmp_path)


def test_swapped_files_detected(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist")
    f = tmp_path / "mnist"
    (f / "t10k-images-idx3-ubyte.gz").rename(f / "tmp.gz")
    (f / "t10k-labels-idx1-ubyte.gz").rename(f / "t10k-images-idx3-ubyte.gz")
    (f / "tmp.gz").rename(f / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(InputDataError, match="1 dimensions, expected 3"):
        load_dataset("mnist", "test", tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist", n=500)
    with pytest.raises(InputDataError, match="holds 500 items.*has 10000"):
        load_dataset("mnist", "test", tmp_path)


def test_data_shorter_than_header(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist")
    f = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-100]))
    with pytest.raises(InputDataError, match=r"truncated or corrupt"):
        load_dataset("mnist", "test", tmp_path)


def test_labels_out_of_range(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist")
    bad = np.full(10000, 12, dtype=np.uint8)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(bad)))
    with pytest.raises(InputDataError, match="labels outside 0..9"):
        load_dataset("mnist", "test", tmp_path)

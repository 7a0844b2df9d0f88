"""Downloads with checksums: the official URLs and digests, and a verified fetch-and-extract."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fewshot_bench.errors import DataNotFoundError, InputDataError

USER_AGENT = "fewshot-bench/0.1 (+https://github.com/; dataset download)"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One file to fetch: its name in the dataset folder, mirror URLs and a checksum."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    extract: bool = False  # unpack the archive into the folder after verifying it

    @property
    def url(self) -> str:
        return self.urls[0]


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_PROTONETS = ("jakesnell/prototypical-networks", "c9bb4d258267c11cb6e23f0a19242d24ca98ad8a")
_CIFARFS = ("ArnoutDevos/maml-cifar-fs", "56b8dfd367d916d1f5b8ec53ae6c9e747232dc71")
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def _mirrored(mirrors: Sequence[str], filename: str) -> tuple[str, ...]:
    return tuple(m + filename for m in mirrors)


#: Every file fewshot-bench can download, per dataset. Checksums are of the upstream files.
RESOURCES: dict[str, dict[str, Resource]] = {
    "omniglot": {
        "images_background": Resource(
            "images_background.zip",
            (_OMNIGLOT + "images_background.zip",),
            md5="68d2efa1b9178cc56df9314c21c6e718",
            extract=True,
        ),
        "images_evaluation": Resource(
            "images_evaluation.zip",
            (_OMNIGLOT + "images_evaluation.zip",),
            md5="6b91aef0f799c5bb55b94e3f2daec811",
            extract=True,
        ),
        **{
            f"splits/vinyals/{s}.txt": Resource(
                f"splits/vinyals/{s}.txt",
                (_gh(*_PROTONETS, f"data/omniglot/splits/vinyals/{s}.txt"),),
                sha256=digest,
            )
            for s, digest in {
                "train": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
                "val": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
                "test": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
                "trainval": "5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a",
            }.items()
        },
    },
    "mnist": {
        name: Resource(name, _mirrored(_MNIST_MIRRORS, name), md5=md5)
        for name, md5 in {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        }.items()
    },
    "fashion-mnist": {
        name: Resource(name, _mirrored(_FASHION_MIRRORS, name), md5=md5)
        for name, md5 in {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        }.items()
    },
    "cifar10": {
        "cifar-10-python.tar.gz": Resource(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    },
    "cifar100": {
        "cifar-100-python.tar.gz": Resource(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            md5="eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    },
    "cifar-fs": {
        f"{s}.txt": Resource(
            f"{s}.txt",
            (_gh(*_CIFARFS, f"data/CIFARFS/cifar-fs-splits/{s}.txt"),),
            sha256=digest,
        )
        for s, digest in {
            "train": "08d41acf21db7203341442e96b2226276217e379bbf809af34849506af1a8c5e",
            "val": "e9ca1bb0404d6f804eb4df42923187eb07052a0c2f87820342b0da1f8c940278",
            "test": "3720c9d858fa547dbf71ca80ede1f94a803279cfdedd3f7a9b9d3beb4ce5c020",
        }.items()
    },
    "mini-imagenet": {
        f"{s}.csv": Resource(
            f"{s}.csv",
            (_gh(*_PROTONETS, f"data/miniImagenet/splits/ravi/{s}.csv"),),
            sha256=digest,
        )
        for s, digest in {
            "train": "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f",
            "val": "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9",
            "test": "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa",
        }.items()
    },
}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``md5`` or ``sha256``)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def checksum_matches(
    path: str | os.PathLike, md5: str | None = None, sha256: str | None = None
) -> bool:
    """True if the file has the given digest(s)."""
    if md5 is None and sha256 is None:
        raise ValueError("give md5 or sha256")
    if sha256 is not None and file_digest(path, "sha256") != sha256.lower():
        return False
    return md5 is None or file_digest(path, "md5") == md5.lower()


def verify_file(path: str | os.PathLike, md5: str | None = None, sha256: str | None = None) -> Path:
    """Return ``path`` if its checksum matches, else raise InputDataError naming file, digests and fix."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"cannot verify {path}: the file does not exist")
    if checksum_matches(path, md5, sha256):
        return path
    algo, want = ("sha256", sha256) if sha256 is not None else ("md5", md5)
    got = file_digest(path, algo)
    raise InputDataError(
        f"checksum mismatch for {path}: {algo} is {got}, expected {want}. The file is corrupt, "
        "truncated or a different version; delete it and download it again"
    )


def download_and_verify(
    url: str | Sequence[str],
    dest: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` (or the first mirror that answers) to ``dest`` and check its md5/sha256.

    A ``dest`` that already has the right checksum is kept and nothing is fetched. The file is
    written to ``dest.part`` and renamed only after it verifies, so ``dest`` is never half-written.
    """
    if md5 is None and sha256 is None:
        raise ValueError("download_and_verify needs an md5 or sha256 checksum")
    dest = Path(dest)
    if dest.exists() and checksum_matches(dest, md5, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    urls = [url] if isinstance(url, str) else list(url)
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    for u in urls:
        try:
            _fetch(u, part, progress=progress, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            part.unlink(missing_ok=True)
            errors.append(f"{u}: {exc}")
            continue
        if not checksum_matches(part, md5, sha256):
            algo, want = ("sha256", sha256) if sha256 is not None else ("md5", md5)
            got = file_digest(part, algo)
            part.unlink(missing_ok=True)
            errors.append(f"{u}: {algo} {got} != expected {want} (corrupt or changed upstream)")
            continue
        os.replace(part, dest)
        return dest
    detail = "\n    ".join(errors)
    bad_checksum = errors and all("expected" in e for e in errors)
    err = InputDataError if bad_checksum else DataNotFoundError
    raise err(
        f"could not download {dest.name} to {dest}:\n    {detail}\n"
        f"  Fix: check the network (or proxy), or fetch {urls[0]} by hand and put it at {dest}"
    )


def _fetch(url: str, dest: Path, *, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name.removesuffix(".part"),
            disable=None if progress else True,  # None: only on a terminal
        ) as bar:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a .zip / .tar(.gz) into ``dest``, refusing members that would land outside it."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)  # zipfile strips absolute paths and ".."
        else:
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # pragma: no cover - Python < 3.10.12
                    root = dest.resolve()
                    for m in tf.getmembers():
                        if not (dest / m.name).resolve().is_relative_to(root):
                            raise InputDataError(f"{archive}: member {m.name} escapes {dest}")
                    tf.extractall(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise InputDataError(
            f"cannot extract {archive}: {exc}. Delete it and download it again"
        ) from exc
    return dest


def fetch_resources(resources: Iterable[Resource], folder: str | os.PathLike) -> list[Path]:
    """Download (and extract, where marked) each resource into ``folder``; skips verified files."""
    folder = Path(folder)
    paths = []
    for res in resources:
        path = download_and_verify(res.urls, folder / res.filename, md5=res.md5, sha256=res.sha256)
        if res.extract:
            extract_archive(path, folder)
        paths.append(path)
    return paths

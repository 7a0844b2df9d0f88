"""Helpers shared by the loaders: image decoding, resizing, the decoded-array cache, path lookup."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fewshot_bench.atomic import atomic_path, remove_stale_temps
from fewshot_bench.data.base import cache_root
from fewshot_bench.errors import InputDataError

#: Bump when the decoding changes, so stale cached arrays are not reused.
CACHE_VERSION = 1

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

# A source is a file path or (name, bytes) read from an archive.
ImageSource = Path | tuple[str, bytes]


def _source_name(src: ImageSource) -> str:
    return str(src) if isinstance(src, Path) else src[0]


def guess_channels(src: ImageSource) -> int:
    """1 for a grayscale image file, 3 otherwise."""
    with _open(src) as im:
        return 1 if im.mode in _GRAY_MODES else 3


def _open(src: ImageSource) -> Image.Image:
    try:
        return Image.open(src if isinstance(src, Path) else io.BytesIO(src[1]))
    except (UnidentifiedImageError, OSError) as exc:
        raise _bad_image(src, exc) from exc


def _bad_image(src: ImageSource, exc: Exception) -> InputDataError:
    return InputDataError(
        f"cannot decode image {_source_name(src)}: {exc}. The file is corrupt or not an image; "
        "delete it (or the archive it came from) and extract or download the dataset again"
    )


def decode_image(src: ImageSource, size: int | None, channels: int) -> np.ndarray:
    """Decode one image to uint8 ``[C, H, W]``, resized to ``size``×``size`` with LANCZOS if given."""
    try:
        with _open(src) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except InputDataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise _bad_image(src, exc) from exc
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def decode_images(
    sources: Sequence[ImageSource], size: int | None, channels: int, desc: str = "decoding"
) -> np.ndarray:
    """Decode many images into one uint8 array ``[N, C, S, S]`` (threads; progress bar on a tty).

    With ``size=None`` every image must already have the same size.
    """
    n = len(sources)
    if n == 0:
        side = size or 0
        return np.zeros((0, channels, side, side), dtype=np.uint8)
    first = decode_image(sources[0], size, channels)
    out = np.empty((n, *first.shape), dtype=np.uint8)
    out[0] = first

    def work(i: int) -> None:
        arr = decode_image(sources[i], size, channels)
        if arr.shape != first.shape:
            raise InputDataError(
                f"images differ in size: {_source_name(sources[0])} is {first.shape[2]}x{first.shape[1]} "
                f"but {_source_name(sources[i])} is {arr.shape[2]}x{arr.shape[1]}; "
                "pass image_size=S to resize them all to S×S"
            )
        out[i] = arr

    workers = max(1, min(4, os.cpu_count() or 1))
    from tqdm.auto import tqdm

    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(
            total=n, desc=desc, unit="img", disable=None if n > 2000 else True, leave=False
        ) as bar,
    ):
        step = 256
        for start in range(1, n, step):
            list(pool.map(work, range(start, min(n, start + step))))
            bar.update(min(n, start + step) - start)
    return out


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size``×``size`` (antialiased bilinear)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        y = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def fingerprint_listing(entries: Iterable[tuple[str, int]]) -> str:
    """SHA-256 of (name, size) pairs: changes when a file is added, removed, renamed or resized."""
    h = hashlib.sha256()
    for name, size in entries:
        h.update(f"{name}\t{size}\n".encode())
    return h.hexdigest()


def cached_array(kind: str, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Return the array cached under ``cache_root()/decoded`` for ``(kind, key)``, building it once.

    Writes are atomic (temp file + rename), so parallel processes never read half a file; the
    temporary files of killed writers are removed. ``kind`` may hold any characters (a split
    name, say): the file name keeps letters, digits, ``-``, ``_`` and ``.`` of it.
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{kind}|{key}".encode()).hexdigest()[:20]
    folder = cache_root() / "decoded"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", kind).lstrip(".")[:100]
    path = folder / f"{safe}-{digest}.npy"
    remove_stale_temps(folder)
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache file: rebuild it below
    arr = build()
    try:
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, arr, allow_pickle=False)
    except OSError:
        pass  # the cache is best effort (read-only or full disk)
    return arr


def list_files(
    folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, *, with_mtime: bool = False
) -> list[tuple[str, int]]:
    """Sorted ``(relative posix path, size)`` of the files under ``folder`` with these endings.

    With ``with_mtime`` the second item is ``size * 10**20 + mtime_ns`` (a change of either shows).
    """
    out: list[tuple[str, int]] = []
    stack = [("", os.fspath(folder))]
    while stack:
        prefix, path = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append((prefix + entry.name + "/", entry.path))
                elif entry.name.lower().endswith(extensions):
                    st = entry.stat()
                    stamp = st.st_size * 10**20 + st.st_mtime_ns if with_mtime else st.st_size
                    out.append((prefix + entry.name, stamp))
    out.sort()
    return out


def resolve_user_path(path: str | os.PathLike, root: Path) -> Path:
    """A user-given path: as given if it exists (or is absolute), else relative to the data root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    under_root = root / p
    return under_root if under_root.exists() else p

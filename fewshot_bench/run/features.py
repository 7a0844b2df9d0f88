"""Feature cache: a frozen embedder's features of a pool, computed once and kept on disk.

Entries are ``torch.save``'d float32 tensors ``[N, D]``, read back with ``weights_only=True``
(an entry is data: anything else in the file is refused, never run). An entry that cannot be
read, is not such a tensor or holds unusable values is recomputed and replaced. Temporary files
of writers that were killed are removed on the next use of the folder.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path

import torch

from fewshot_bench.atomic import atomic_path, remove_stale_temps
from fewshot_bench.backbones.embedders import Embedder
from fewshot_bench.data.base import LabeledData, cache_root, feature_problem
from fewshot_bench.errors import InputDataError

RESCALE_FIX = (
    "normalise or rescale the features (e.g. L2-normalise each row, or divide by the largest "
    "norm) so that their squared norms fit in float32"
)


def feature_cache_path(data: LabeledData, embedder: Embedder) -> Path:
    """Where the features of ``data`` under ``embedder`` are cached (inside ``cache_root()``)."""
    key = hashlib.sha256(f"{data.fingerprint()}|{embedder.identity}".encode()).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", data.name).lstrip(".")[:64] or "data"
    return cache_root() / "features" / f"{safe}-{key}.pt"


def _cached(path: Path, data: LabeledData) -> torch.Tensor | None:
    """The cache entry at ``path`` if it is usable for ``data``; ``None`` (and a warning) if not."""
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        why = "it holds objects other than tensors, which weights-only loading refused unrun"
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is recomputed
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        if not isinstance(feats, torch.Tensor):
            why = f"it holds a {type(feats).__name__}, not a tensor"
        elif feats.dtype != torch.float32 or feats.ndim != 2 or feats.shape[0] != len(data):
            why = f"it holds {feats.dtype} {tuple(feats.shape)}, not float32 [{len(data)}, D]"
        elif (problem := feature_problem(feats)) is not None:
            why = f"its features {problem}"
        else:
            return feats
    warnings.warn(f"feature cache entry {path} is unusable ({why}); recomputing it", stacklevel=3)
    return None


#: The entry read last, by its file's identity (path, inode, size, modification time): a run of
#: several protocols on one pool (each label budget of a split) reads and checks it once.
_LAST_READ: tuple[tuple, torch.Tensor] | None = None


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(stamp: tuple, feats: torch.Tensor) -> None:
    global _LAST_READ
    _LAST_READ = (stamp, feats)


def pool_features(data: LabeledData, embedder: Embedder, device: torch.device) -> torch.Tensor:
    """Features ``[N, D]`` of every item of ``data`` (cached per data fingerprint and embedder id).

    Raises InputDataError when the features hold NaN/inf or are so large that squared norms
    (and so distances) overflow float32."""
    if data.kind == "features":
        problem = feature_problem(data.features)
        if problem is not None:
            source = data.meta.get("source", f"{data.name}/{data.split}")
            raise InputDataError(f"features of {source}: they {problem}; {RESCALE_FIX}")
        return data.features
    path = feature_cache_path(data, embedder)
    remove_stale_temps(path.parent)
    if path.exists():
        stamp = _stamp(path)
        if _LAST_READ is not None and _LAST_READ[0] == stamp:
            return _LAST_READ[1]
        feats = _cached(path, data)
        if feats is not None:
            _remember(stamp, feats)
            return feats
    feats = embedder.embed(data.images, device).float().cpu().contiguous()
    if feats.ndim != 2 or feats.shape[0] != len(data):
        raise InputDataError(
            f"backbone {embedder.identity} returned features of shape {tuple(feats.shape)} for "
            f"{len(data)} images of {data.name}; an embedder must return [N, D]"
        )
    if not torch.isfinite(feats).all():
        raise InputDataError(
            f"backbone {embedder.identity} produced NaN/inf features on {data.name}; "
            "the checkpoint is broken or diverged: retrain it or pick another --backbone"
        )
    problem = feature_problem(feats)
    if problem is not None:
        raise InputDataError(
            f"backbone {embedder.identity} features on {data.name}: they {problem}; the "
            f"checkpoint is broken or diverged: retrain it, pick another --backbone, or {RESCALE_FIX}"
        )
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats

"""Feature cache: a frozen embedder's features of a pool, computed once and kept on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fewshot_bench.atomic import atomic_path
from fewshot_bench.backbones.embedders import Embedder
from fewshot_bench.data.base import LabeledData, cache_root
from fewshot_bench.errors import InputDataError


def feature_cache_path(data: LabeledData, embedder: Embedder) -> Path:
    key = hashlib.sha256(f"{data.fingerprint()}|{embedder.identity}".encode()).hexdigest()[:24]
    return cache_root() / "features" / f"{data.name}-{key}.pt"


def pool_features(data: LabeledData, embedder: Embedder, device: torch.device) -> torch.Tensor:
    """Features ``[N, D]`` of every item of ``data`` (cached per data fingerprint and embedder id)."""
    if data.kind == "features":
        return data.features
    path = feature_cache_path(data, embedder)
    if path.exists():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if feats.shape[0] == len(data):
                return feats
        except (RuntimeError, EOFError, OSError):
            pass  # a corrupt cache entry is recomputed below
    feats = embedder.embed(data.images, device).float().cpu().contiguous()
    if not torch.isfinite(feats).all():
        raise InputDataError(
            f"backbone {embedder.identity} produced NaN/inf features on {data.name}; "
            "the checkpoint is broken or diverged: retrain it or pick another --backbone"
        )
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats

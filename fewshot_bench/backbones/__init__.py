"""Backbones and embedders that turn images into features."""

from fewshot_bench.backbones.embedders import Embedder, get_embedder, register_embedder

__all__ = ["Embedder", "get_embedder", "register_embedder"]
from fewshot_bench.backbones import checkpoint  # noqa: E402,F401  (registers the checkpoint: embedder)

"""Embedders: frozen maps from uint8 images to float32 features, named by a spec string.

``pixels`` flattens and scales pixels to [0, 1] (no training; the floor every metric must beat).
Other specs (e.g. ``checkpoint:PATH``) come from factories added with ``register_embedder``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewshot_bench.errors import ProtocolError


class Embedder:
    """Maps uint8 images ``[N, C, H, W]`` to float32 features ``[N, D]``."""

    #: Stable id of the weights and preprocessing; part of every feature-cache key.
    identity: str = "abstract"

    def embed(
        self, images: torch.Tensor, device: torch.device, batch_size: int = 512
    ) -> torch.Tensor:
        raise NotImplementedError


class PixelEmbedder(Embedder):
    identity = "pixels/v1"

    def embed(
        self, images: torch.Tensor, device: torch.device, batch_size: int = 512
    ) -> torch.Tensor:
        return images.reshape(len(images), -1).float().div_(255.0)


_FACTORIES: dict[str, Callable[[str], Embedder]] = {"pixels": lambda arg: PixelEmbedder()}


def register_embedder(
    prefix: str,
) -> Callable[[Callable[[str], Embedder]], Callable[[str], Embedder]]:
    """Register a factory for specs ``PREFIX`` or ``PREFIX:ARG``."""

    def decorate(factory: Callable[[str], Embedder]) -> Callable[[str], Embedder]:
        _FACTORIES[prefix] = factory
        return factory

    return decorate


def get_embedder(spec: str) -> Embedder:
    """The embedder for a spec such as ``pixels`` or ``checkpoint:runs/conv4.pt``."""
    prefix, _, arg = spec.partition(":")
    if prefix not in _FACTORIES:
        raise ProtocolError(f"unknown backbone {spec!r}; known prefixes: {sorted(_FACTORIES)}")
    return _FACTORIES[prefix](arg)

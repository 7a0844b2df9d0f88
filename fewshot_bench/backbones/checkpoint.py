"""Pretraining checkpoints: atomic save, load, weight hashes, and the ``checkpoint`` embedder.

A checkpoint is a ``torch.save``'d dict (loadable with ``weights_only=True``)::

    format          "fewshot-bench/pretrain-v1"
    arch, in_channels, image_size, out_dim     how to rebuild the backbone
    objective       "ce" | "nca" | "instance"
    step, steps     optimisation steps done / planned
    state_dict      the backbone's weights (what the embedder uses)
    objective_state head weights and memory bank (NCE normaliser included)
    optimizer, scaler, rng                     what ``--resume`` needs
    config          the PretrainConfig as a dict; data: dataset name/split/fingerprint/size
    history         [[step, mean loss], ...]; wall_seconds: training time so far
    weights_sha256  hash of ``state_dict`` (recomputed on load, never trusted)

``get_embedder("checkpoint:PATH")`` gives the backbone's raw (not normalised) features:
``out_dim`` floats per image, e.g. 64 for Conv-4 at 28×28; methods normalise as they need.
``get_embedder("checkpoint:PATH#embed")`` gives the L2-normalised 128-d projection that the
NCA / instance objectives trained (the metric of metric transfer). Images whose size or
channel count differ from the checkpoint's are resized (antialiased bilinear) and converted
(gray → 3 copies, RGB → luminance) first. The embedder's identity, which keys the feature
cache, is the SHA-256 of the weights it uses, so retrained weights never reuse stale features.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from fewshot_bench.atomic import atomic_path
from fewshot_bench.backbones.embedders import Embedder, register_embedder
from fewshot_bench.backbones.nets import Backbone, build_backbone
from fewshot_bench.errors import InputDataError

FORMAT = "fewshot-bench/pretrain-v1"
LAYERS = ("backbone", "embed")


def state_dict_sha256(*state_dicts: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for sd in state_dicts:
        for name in sorted(sd):
            t = sd[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {**ckpt, "format": FORMAT, "weights_sha256": state_dict_sha256(ckpt["state_dict"])}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            f"checkpoint {path} does not exist; train one with `fsbench pretrain ... --out {path}`"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        why = (
            "it holds objects other than tensors and plain values, refused without running them"
            if isinstance(exc, pickle.UnpicklingError)
            else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        raise InputDataError(f"checkpoint {path} cannot be read ({why}); retrain it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputDataError(
            f"{path} is not a fewshot-bench pretraining checkpoint (format {FORMAT}); "
            "write one with `fsbench pretrain`"
        )
    return ckpt


def backbone_from_checkpoint(ckpt: dict[str, Any]) -> Backbone:
    """Rebuild the backbone of a loaded checkpoint with its weights, in eval mode."""
    model = build_backbone(ckpt["arch"], ckpt["in_channels"], ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def adapt_images(images: torch.Tensor, in_channels: int, image_size: int) -> torch.Tensor:
    """Convert uint8 images to the channel count and square size a backbone was trained on."""
    from fewshot_bench.data._common import resize_images

    c = images.shape[1]
    if c != in_channels:
        if c == 1:
            images = images.expand(-1, in_channels, -1, -1)
        elif in_channels == 1 and c == 3:
            lum = images[:, 0] * 0.299 + images[:, 1] * 0.587 + images[:, 2] * 0.114
            images = lum.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
        else:
            raise InputDataError(
                f"images have {c} channels but the checkpoint expects {in_channels}"
            )
    if images.shape[-2:] != (image_size, image_size):
        images = resize_images(images.contiguous(), image_size)
    return images


class CheckpointEmbedder(Embedder):
    """Features of a pretrained backbone (``layer="backbone"``) or its L2-normalised
    projection head (``layer="embed"``), computed in eval mode under ``torch.no_grad``."""

    def __init__(self, path: str | os.PathLike, layer: str = "backbone") -> None:
        if layer not in LAYERS:
            raise InputDataError(f"checkpoint layer {layer!r} unknown; use one of {LAYERS}")
        self.path = Path(path)
        ckpt = load_checkpoint(self.path)
        self.arch = ckpt["arch"]
        self.in_channels = int(ckpt["in_channels"])
        self.image_size = int(ckpt["image_size"])
        self.layer = layer
        self.model = backbone_from_checkpoint(ckpt)
        self.head: torch.nn.Linear | None = None
        hashed = [ckpt["state_dict"]]
        if layer == "embed":
            obj = ckpt.get("objective_state", {})
            if "head.weight" not in obj or ckpt["objective"] == "ce":
                raise InputDataError(
                    f"{self.path} was trained with objective {ckpt['objective']!r}, which has no "
                    "embedding head; use checkpoint:PATH (backbone features) instead"
                )
            w, b = obj["head.weight"], obj["head.bias"]
            self.head = torch.nn.Linear(w.shape[1], w.shape[0])
            self.head.load_state_dict({"weight": w, "bias": b})
            hashed.append({"head.weight": w, "head.bias": b})
        self.weights_sha256 = state_dict_sha256(*hashed)
        self.out_dim = self.head.out_features if self.head is not None else self.model.out_dim
        self.identity = (
            f"checkpoint/v1/{self.arch}/{layer}/{self.in_channels}x{self.image_size}/"
            f"{self.weights_sha256[:32]}"
        )

    @torch.no_grad()
    def embed(
        self, images: torch.Tensor, device: torch.device, batch_size: int = 512
    ) -> torch.Tensor:
        device = torch.device(device)
        model = self.model.to(device).eval()
        head = self.head.to(device).eval() if self.head is not None else None
        out = torch.empty(len(images), self.out_dim, dtype=torch.float32)
        for start in range(0, len(images), batch_size):
            x = adapt_images(images[start : start + batch_size], self.in_channels, self.image_size)
            f = model(x.to(device, non_blocking=True)).float()
            if head is not None:
                f = F.normalize(head(f), dim=1)
            out[start : start + len(f)] = f.cpu()
        return out


@register_embedder("checkpoint")
def _checkpoint_factory(arg: str) -> Embedder:
    path, _, layer = arg.partition("#")
    if not path:
        raise InputDataError("checkpoint backbone needs a path: --backbone checkpoint:PATH[#embed]")
    return CheckpointEmbedder(path, layer or "backbone")

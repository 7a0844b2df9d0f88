"""Shared helpers of the image-consuming baselines: seeded network construction, prototypes
and distances, chunked embedding, learning-rate schedule and the running training log.

Training episodes on a ``FitSource`` (base classes) come from the evaluation sampler,
:meth:`fewshot_bench.tasks.sampler.EpisodeSampler.for_training`; evaluation tasks come from the
protocol's frozen manifest.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_bench.backbones.nets import Backbone, build_backbone
from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.runtime import autocast, seeded


def require_images(source_kind: str, method: str) -> None:
    """Fail clearly when an image method is handed features."""
    if source_kind != "images":
        raise ProtocolError(f"method {method!r} consumes images, but was given {source_kind}")


def seeded_backbone(
    arch: str, in_channels: int, image_size: int, seed: int, device: torch.device
) -> Backbone:
    """``build_backbone`` with weights initialised from ``seed`` (global RNG left untouched)."""
    with seeded(seed):
        net = build_backbone(arch, in_channels, image_size)
    return net.to(device)


def image_geometry(images: torch.Tensor) -> tuple[int, int]:
    """(channels, side) of square images ``[N, C, S, S]``."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ProtocolError(f"expected square images [N, C, S, S], got shape {tuple(images.shape)}")
    return int(images.shape[1]), int(images.shape[-1])


def prototypes(emb: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means ``[..., n_way, D]`` of ``emb`` ``[..., n, D]`` with labels ``[..., n]``."""
    onehot = torch.nn.functional.one_hot(labels, n_way).to(emb.dtype)
    counts = onehot.sum(dim=-2).clamp_min(1)
    return (onehot.transpose(-1, -2) @ emb) / counts.unsqueeze(-1)


def sq_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[..., n, k]`` between ``x`` ``[..., n, D]`` and ``centers``."""
    d = (
        x.pow(2).sum(-1, keepdim=True)
        - 2 * x @ centers.transpose(-1, -2)
        + centers.pow(2).sum(-1).unsqueeze(-2)
    )
    return d.clamp_min(0)


def embed(
    net: nn.Module, images: torch.Tensor, device: torch.device, chunk: int | None = None
) -> torch.Tensor:
    """Features of ``images`` in eval mode without gradients, ``chunk`` images per forward
    (default 1024 on CPU, 8192 on CUDA)."""
    chunk = chunk or (8192 if device.type == "cuda" else 1024)
    was_training = net.training
    net.eval()
    outs = []
    with torch.no_grad(), autocast(device):
        for i in range(0, images.shape[0], chunk):
            outs.append(net(images[i : i + chunk].to(device, non_blocking=True)).float())
    net.train(was_training)
    if not outs:
        return torch.zeros(0, getattr(net, "out_dim", 0), device=device)
    return torch.cat(outs)


def step_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, every: int) -> None:
    """Halve the learning rate every ``every`` steps (Snell et al.'s schedule); 0 = constant."""
    lr = base_lr * (0.5 ** (step // every)) if every > 0 else base_lr
    for group in optimizer.param_groups:
        group["lr"] = lr


class TrainingLog:
    """Mean loss and accuracy over windows of ``every`` steps: each window is appended to
    ``entries`` (a method's ``train_log``) as ``{step, loss, acc, seconds}`` and shown on ``bar``."""

    def __init__(self, entries: list[dict[str, float]], bar: Any, every: int) -> None:
        self.entries, self.bar, self.every = entries, bar, every
        self.start = time.perf_counter()
        self._loss = self._acc = 0.0
        self._n = 0

    def update(self, step: int, n_steps: int, loss: float, acc: float) -> None:
        """Record step ``step`` (0-based) of ``n_steps``; closes a window every ``every`` steps
        and at the last step."""
        self._loss += loss
        self._acc += acc
        self._n += 1
        if (step + 1) % self.every and step + 1 != n_steps:
            return
        mean_loss, mean_acc = self._loss / self._n, self._acc / self._n
        self.entries.append(
            {
                "step": step + 1,
                "loss": mean_loss,
                "acc": mean_acc,
                "seconds": time.perf_counter() - self.start,
            }
        )
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * mean_acc:.1f}%")
        self._loss = self._acc = 0.0
        self._n = 0


def resolve_steps(budget: int | None, steps: int) -> int:
    """The number of training steps: the runner's ``budget`` when given, else the ``steps`` param."""
    n = steps if budget is None else budget
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ProtocolError(f"training steps must be an integer >= 0, got {n!r}")
    return n


def _load_problem(exc: Exception) -> str:
    """Why a weights-only load failed, without torch's advice to retry unsafely."""
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain values, refused without running them"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A state saved by a method's ``state_dict`` (e.g. from the runner's fit cache)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FsbenchError(f"init state {p} does not exist (give the path of a saved .pt state)")
    try:
        # weights_only: a state file is data; unpickling arbitrary objects would run its code
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise FsbenchError(
            f"init state {p} cannot be read as a saved state ({_load_problem(exc)}); save it "
            "again with `fsbench run ... --save-state FILE`"
        ) from None


def group_by_shape(tasks: list[Any]) -> list[list[int]]:
    """Indices of tasks grouped by (support, unlabeled, query shapes, n_way) for batching."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        key = (
            tuple(t.support.shape),
            tuple(t.unlabeled.shape),
            tuple(t.query.shape),
            t.n_way,
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())

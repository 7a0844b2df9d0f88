"""One runtime policy for every part of the suite: which device, which mixed precision, how a
block is seeded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fewshot_bench.errors import FsbenchError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU, or a device torch does not
    know, is a one-line error."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise FsbenchError(
            f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FsbenchError(
            "--device cuda asked for, but torch sees no CUDA device; use --device auto or cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise FsbenchError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The one mixed-precision policy: bfloat16 autocast on CUDA (same exponent range as float32,
    so no loss scaling is needed), a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's global RNG seeded to ``seed``, restoring the outer state after."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        yield

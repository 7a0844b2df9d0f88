"""Batched, seeded image augmentations as tensor ops (no per-image Python loop).

All random numbers come from the ``torch.Generator`` passed in (a CPU generator), so a
training step's augmentation depends only on that generator's state, on CPU and CUDA alike.
Inputs and outputs are float images in [0, 1], ``[N, C, H, W]``.

Presets (``AUGMENTS``):

- ``none``: identity;
- ``light``: random resized crop (area 0.6–1, aspect 3/4–4/3) and horizontal flip;
- ``strong``: random resized crop (area 0.2–1) + flip + brightness/contrast jitter (±0.4) and,
  for colour images, saturation jitter (±0.4) and random grayscale (p = 0.2), as in
  instance discrimination (Wu et al. 2018).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Parameters of one augmentation preset."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    jitter: float = 0.0
    grayscale_p: float = 0.0


AUGMENTS: dict[str, AugmentSpec] = {
    "none": AugmentSpec(),
    "light": AugmentSpec(crop_scale=(0.6, 1.0), flip=True),
    "strong": AugmentSpec(crop_scale=(0.2, 1.0), flip=True, jitter=0.4, grayscale_p=0.2),
}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> torch.Tensor:
    """Crop a random box of area ``scale`` and aspect ``ratio`` from each image, resize it back
    to the input size, and mirror half of the images when ``flip``."""
    n = x.shape[0]
    area = _uniform(n, *scale, gen)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    aspect = torch.exp(log_r)
    # box width / height as fractions of the image side, clipped to the image
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor, gen: torch.Generator, strength: float, grayscale_p: float
) -> torch.Tensor:
    """Random brightness and contrast (and saturation, grayscale for 3-channel images)."""
    n, c = x.shape[:2]
    dev, dt = x.device, x.dtype

    def factor() -> torch.Tensor:
        return _uniform(n, 1 - strength, 1 + strength, gen).to(dev, dt).view(n, 1, 1, 1)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    if c == 3:
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = (x - gray) * factor() + gray
        to_gray = (torch.rand(n, generator=gen) < grayscale_p).to(dev).view(n, 1, 1, 1)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = torch.where(to_gray, gray, x)
    return x.clamp(0.0, 1.0)


def augment(x: torch.Tensor, gen: torch.Generator, spec: AugmentSpec | str) -> torch.Tensor:
    """Apply a preset (name or ``AugmentSpec``) to float images in [0, 1]."""
    if isinstance(spec, str):
        spec = AUGMENTS[spec]
    if spec.crop_scale != (1.0, 1.0) or spec.flip:
        x = random_resized_crop(x, gen, spec.crop_scale, flip=spec.flip)
    if spec.jitter > 0:
        x = color_jitter(x, gen, spec.jitter, spec.grayscale_p)
    return x

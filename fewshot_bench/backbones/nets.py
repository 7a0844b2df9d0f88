"""Backbones of the few-shot and semi-supervised literature: Conv-4, ResNet-12, WRN-28-k.

Every backbone takes images ``[N, C, H, W]``, either uint8 (0..255) or float in [0, 1], scales
them to [-1, 1] with ``(x - 0.5) / 0.5`` itself, and returns one feature vector per image
``[N, out_dim]``:

- ``conv4``: four blocks conv3×3(64)-BN-ReLU-maxpool2, flattened (Vinyals et al. 2016, Snell
  et al. 2017): 64-d at 28×28, 256-d at 32×32, 1600-d at 84×84;
- ``resnet12``: four residual blocks of three conv3×3 (64-160-320-640 channels, LeakyReLU 0.1,
  1×1 shortcut, maxpool2; Oreshkin et al. 2018, Lee et al. 2019), global average pool: 640-d;
- ``wrn-28-2`` / ``wrn-28-10`` (any ``wrn-D-K`` with (D − 4) divisible by 6): pre-activation
  wide ResNet (Zagoruyko & Komodakis 2016, as in Oliver et al. 2018 and FixMatch), global
  average pool: 64·K-d.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_bench.choices import ARCHS
from fewshot_bench.errors import ProtocolError

_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [0, 1]; float images are returned as they are."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float() if not x.is_floating_point() else x


class Backbone(nn.Module):
    """Base class: ``forward`` normalises the input and returns ``[N, out_dim]`` features."""

    arch: str = "abstract"

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_dim = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((to_unit_range(x) - 0.5) / 0.5)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4(Backbone):
    """Four conv3×3-BN-ReLU-maxpool blocks of ``hidden`` channels, flattened."""

    arch = "conv4"

    def __init__(self, in_channels: int, image_size: int, hidden: int = 64) -> None:
        super().__init__(in_channels, image_size)
        self.encoder = nn.Sequential(
            _conv_block(in_channels, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ProtocolError(
                f"conv4 needs images of at least 16×16, got {image_size}×{image_size}"
            )
        self.out_dim = hidden * side * side

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)


class _ResBlock12(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        return self.pool(F.leaky_relu(out + self.shortcut(x), 0.1))


class ResNet12(Backbone):
    """ResNet-12 (64-160-320-640) with global average pooling: 640-d features."""

    arch = "resnet12"

    def __init__(
        self, in_channels: int, image_size: int, widths: tuple[int, ...] = (64, 160, 320, 640)
    ) -> None:
        super().__init__(in_channels, image_size)
        if image_size < 16:
            raise ProtocolError(f"resnet12 needs images of at least 16×16, got {image_size}")
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(_ResBlock12(cin, w))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            None
            if cin == cout and stride == 1
            else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Backbone):
    """WRN-depth-k (pre-activation, 16-16k-32k-64k channels), global average pool: 64k-d."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        depth: int = 28,
        widen: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, image_size)
        if (depth - 4) % 6:
            raise ProtocolError(f"WRN depth must be 6n + 4 (e.g. 28), got {depth}")
        n = (depth - 4) // 6
        self.arch = f"wrn-{depth}-{widen}"
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers, cin = [], widths[0]
        for g, stride in zip(range(3), (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(_WideBlock(cin, widths[g + 1], stride if i == 0 else 1, dropout))
                cin = widths[g + 1]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return out.mean(dim=(2, 3))


def build_backbone(arch: str, in_channels: int, image_size: int) -> Backbone:
    """A freshly initialised backbone ``conv4``, ``resnet12`` or ``wrn-D-K``; see ``.out_dim``."""
    key = arch.strip().lower().replace("_", "-")
    if key in ("conv4", "conv-4"):
        return Conv4(in_channels, image_size)
    if key in ("resnet12", "resnet-12"):
        return ResNet12(in_channels, image_size)
    m = _WRN.match(key)
    if m:
        return WideResNet(in_channels, image_size, depth=int(m.group(1)), widen=int(m.group(2)))
    raise ProtocolError(
        f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} (or wrn-D-K)"
    )

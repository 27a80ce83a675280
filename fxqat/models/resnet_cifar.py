"""CIFAR ResNets (He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016, §4.2).

Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32 inputs; depth ``6n + 2`` (ResNet-20: n = 3,
about 0.27 M parameters). The shortcut that changes shape is selectable:

* ``"A"``: parameter-free, the input subsampled by 2 and zero-padded in channels (the paper's CIFAR choice);
* ``"B"``: a 1x1 strided convolution + BatchNorm projection.

Every module is torch.fx-traceable (no lambdas, no data-dependent control flow).

Example:
    >>> import torch
    >>> m = resnet20()
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in m.parameters())
    269722
"""

from __future__ import annotations

from typing import List, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "PadShortcut", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut((planes - in_planes) // 2)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                raise ValueError(f"BasicBlock(shortcut={shortcut!r}): use 'A' (zero-pad) or 'B' (1x1 projection).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: conv 16 -> 3 stages (16, 32, 64 channels, ``num_blocks`` each) -> pool -> fc.

    Args:
        num_blocks: blocks per stage, e.g. ``[3, 3, 3]`` for ResNet-20.
        num_classes: output classes.
        shortcut: ``"A"`` or ``"B"`` (see the module docstring).
        in_channels: input channels (3 for CIFAR).
    """

    def __init__(self, num_blocks: List[int], num_classes: int = 10, shortcut: Shortcut = "A",
                 in_channels: int = 3) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet(shortcut={shortcut!r}): use 'A' (zero-pad) or 'B' (1x1 projection).")
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, num_blocks[0], 1, shortcut)
        self.layer2 = self._stage(32, num_blocks[1], 2, shortcut)
        self.layer3 = self._stage(64, num_blocks[2], 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, n: int, stride: int, shortcut: Shortcut) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _depth(n: int):
    def make(num_classes: int = 10, shortcut: Shortcut = "A", in_channels: int = 3) -> CifarResNet:
        return CifarResNet([n, n, n], num_classes, shortcut, in_channels)

    make.__name__ = f"resnet{6 * n + 2}"
    make.__doc__ = f"CIFAR ResNet-{6 * n + 2} ({n} blocks per stage)."
    return make


resnet20 = _depth(3)
resnet32 = _depth(5)
resnet44 = _depth(7)
resnet56 = _depth(9)
resnet110 = _depth(18)

"""Small models for MNIST and scikit-learn digits: an MLP and a CNN (both torch.fx-traceable).

Example:
    >>> import torch
    >>> SmallCNN(in_channels=1)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> MLP(in_shape=(1, 8, 8))(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """Flatten -> (Linear-BN-ReLU) x len(hidden) -> Linear.

    Args:
        num_classes: outputs.
        in_shape: ``(C, H, W)`` of one input (flattened).
        hidden: widths of the hidden layers.
    """

    def __init__(self, num_classes: int = 10, in_shape: Sequence[int] = (1, 28, 28),
                 hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        n_in = 1
        for d in in_shape:
            n_in *= int(d)
        layers: list = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.BatchNorm1d(h), nn.ReLU()]
            n_in = h
        layers.append(nn.Linear(n_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _cbr(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers (widths ``w, 2w, 2w, 4w``; two of them stride 2), global pool, linear classifier.

    Works on any input size >= 4x4 (MNIST 28x28, digits 8x8, CIFAR 32x32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(in_channels, width, 1), _cbr(width, 2 * width, 2), _cbr(2 * width, 2 * width, 1),
            _cbr(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

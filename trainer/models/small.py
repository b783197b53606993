"""Small models for the 8×8 digits data: a multilayer perceptron and a convolutional net."""

from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: int = 128, num_classes: int = 10, depth: int = 2) -> nn.Module:
    """``depth`` hidden layers of width ``hidden`` with GELU; input is flattened first."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """Two 3×3 conv blocks for (N, 1, 8, 8) images, then a linear head.

    GroupNorm rather than BatchNorm: it normalises each example on its own, so the result does
    not depend on how a global batch is split over workers (runs on 1, 2 or 4 agree).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.GroupNorm(4, width),
        nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.GroupNorm(4, 2 * width),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )

"""CIFAR ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", 2016, sec. 4.2).

Three stages of three basic blocks with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps,
then global average pooling and a linear head: 6n + 2 = 20 weighted layers for n = 3.
Shortcuts are identities except where a stage halves the resolution and doubles the channels;
there option A of the paper is used (subsample by two, zero-pad the new channels), which adds
no parameters. Every op here supports double backward, as AdaHessian needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu(bn(conv(relu(bn(conv(x))))) + x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _PadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of ``blocks_per_stage`` blocks, pool, linear."""

    def __init__(
        self, blocks_per_stage: int = 3, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions (He et al. 2015), unit BN scales, default linear head."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 32x32 inputs (about 0.27 M parameters)."""
    return ResNet(blocks_per_stage=3, widths=(16, 32, 64), num_classes=num_classes)

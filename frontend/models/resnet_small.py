"""ResNet-8: the smallest residual net of the zoo (1×28×28), for benchmarks that train many times.

Same structure as ResNet-20 (BasicBlocks with residual adds, BatchNorm, 1×1 conv-BN shortcuts,
global average pooling) with one block per stage instead of three: about a third of ResNet-20's
MACs, so the quantization accuracy table can fine-tune it with a real budget on a 2-core CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import _init_weights, _stage


class ResNet8(nn.Module):
    """ResNet-8: stem conv + 3 stages × 1 BasicBlock (16/32/64 channels) + fc; 28 → 14 → 7."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _stage(16, 16, 1, stride=1)
        self.layer2 = _stage(16, 32, 1, stride=2)
        self.layer3 = _stage(32, 64, 1, stride=2)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def resnet8(num_classes: int = 10) -> ResNet8:
    """ResNet-8 for 1×28×28 inputs."""
    return ResNet8(num_classes=num_classes)

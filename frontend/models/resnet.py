"""ResNets: ResNet-20 (CIFAR-style, here for 1×28×28 inputs) and ResNet-18 (ImageNet, 3×224×224).

Both use the same BasicBlock with option-B shortcuts (1×1 conv + BN) where the shape
changes.  Global average pooling is written as ``x.mean((2, 3))`` rather than
``AdaptiveAvgPool2d``: same result, and one reduction op fewer for the importers.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a residual add; a 1×1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    # torchvision's ResNet initialisation: He-normal convs, unit BN scale.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) (He et al. 2016, CIFAR variant): 3 stages × n BasicBlocks, 16/32/64 channels.

    Adapted to 1×28×28 inputs: feature maps 28 → 14 → 7, then global average pooling.
    """

    depth = 20

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if (self.depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, not {self.depth}")
        blocks = (self.depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _stage(16, 16, blocks, stride=1)
        self.layer2 = _stage(16, 32, blocks, stride=2)
        self.layer3 = _stage(32, 64, blocks, stride=2)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class ResNet20(CifarResNet):
    """ResNet-20: 3 stages × 3 blocks."""

    depth = 20


class ResNet18(nn.Module):
    """ResNet-18 with torchvision's layout and parameter names (3×224×224, 1000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 2, stride=1)
        self.layer2 = _stage(64, 128, 2, stride=2)
        self.layer3 = _stage(128, 256, 2, stride=2)
        self.layer4 = _stage(256, 512, 2, stride=2)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def resnet20(num_classes: int = 10) -> ResNet20:
    """ResNet-20 for 1×28×28 inputs."""
    return ResNet20(num_classes=num_classes)


def resnet18(num_classes: int = 1000) -> ResNet18:
    """ResNet-18 for 3×224×224 inputs."""
    return ResNet18(num_classes=num_classes)

"""LeNet-5 for 1×28×28 images (Fashion-MNIST, MNIST): the smallest conv net in the zoo."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv5×5·6 → pool → conv5×5·16 → pool → fc120 → fc84 → fc10, ReLU, max pooling.

    The first conv pads by 2 so a 28×28 input sees the 32×32 geometry of the original
    LeNet-5 (feature maps 28 → 14 → 10 → 5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = x.flatten(1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 for 1×28×28 inputs."""
    return LeNet5(num_classes=num_classes)

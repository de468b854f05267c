"""VGG-11 with BatchNorm (Simonyan & Zisserman 2015, config A), 3×224×224, 1000 classes.

The dense-heavy classic: 133M parameters, 93% of them in the three fully connected layers.
Parameter names follow torchvision's ``vgg11_bn`` (``features.N``, ``classifier.N``).
Keeps torchvision's ``AdaptiveAvgPool2d((7, 7))`` (TVM's torch frontend imports it; at the
224×224 input the last feature map is already 7×7, so it is the identity there).
"""

from __future__ import annotations

import torch
from torch import nn

# "M" is a 2×2 max pool; numbers are 3×3 conv output channels.
VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG feature stack (conv-BN-ReLU, max pools) and the 4096-4096 classifier."""

    def __init__(self, config=VGG11_CONFIG, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def vgg11_bn(num_classes: int = 1000) -> VGG:
    """VGG-11 with BatchNorm for 3×224×224 inputs."""
    return VGG(VGG11_CONFIG, num_classes=num_classes)

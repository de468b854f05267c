"""A tiny MobileNet-style net with BatchNorm and ReLU6 for the data-free quantization tests."""

import torch
from torch import nn


class TinyMBConv(nn.Module):
    """stem conv+BN+ReLU6 → 1×1 expand+BN+ReLU6 → depthwise+BN+ReLU6 → 1×1 project+BN (+ residual)
    → pool → linear; one ReLU6 module shared by every activation, as EfficientNet-Lite does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.expand(x)))
        y = self.act(self.bn2(self.dw(y)))
        y = self.bn3(self.project(y))
        return self.fc((x + y).mean((2, 3)))


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyMBConv()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                # very unequal channel ranges, as real depthwise layers have
                m.weight.mul_(torch.exp(2 * torch.randn(m.out_channels)).view(-1, 1, 1, 1))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 3)  # large enough that ReLU6 clips
                m.bias.normal_(0.5, 1)
                m.momentum = None
        # running statistics of a "data" distribution (shifted, correlated noise), so they are reachable
        net.train()
        gen = torch.Generator().manual_seed(seed + 100)
        for _ in range(4):
            x = torch.randn(64, 3, 8, 8, generator=gen)
            net(0.5 + 1.5 * (x + x.roll(1, -1)) / 2)
    return net.eval()

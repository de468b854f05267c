"""Small torch models for the structural-pass tests: each exercises one channel-dependency rule."""

import torch
from torch import nn


class ResidualNet(nn.Module):
    """Stem, an identity residual block, a downsampling block with a 1x1 shortcut, pool, dense."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.d1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.dbn1 = nn.BatchNorm2d(12)
        self.d2 = nn.Conv2d(12, 12, 3, padding=1)
        self.short = nn.Conv2d(8, 12, 1, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(y + self.bn2(self.c2(torch.relu(self.bn1(self.c1(y))))))
        z = self.d2(torch.relu(self.dbn1(self.d1(y)))) + self.short(y)
        return self.fc(torch.relu(z).mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """Inverted residual (expand 1x1, depthwise 3x3, project 1x1) with ReLU6 and a skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.expand = nn.Conv2d(6, 16, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_d = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 6, 1, bias=False)
        self.bn_p = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.stem(x)
        h = nn.functional.relu6(self.bn_e(self.expand(y)))
        h = nn.functional.relu6(self.bn_d(self.dw(h)))
        y = y + self.bn_p(self.project(h))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a conv reading the concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)))
        return self.fc(torch.relu(self.c(y)).mean(dim=(2, 3)))


class FlattenNet(nn.Module):
    """Conv, flatten of a 4x4 map straight into a dense layer, and a hidden dense layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class GroupedNet(nn.Module):
    """A grouped conv (groups=2) and a flip across channels: neither can be pruned safely."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.g(torch.relu(self.c1(x))))
        y = torch.flip(torch.relu(self.c2(y)), dims=[1])
        return self.fc(torch.relu(self.c3(y)).mean(dim=(2, 3)))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and batch-norm statistics, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()

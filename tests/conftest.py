"""Shared fixtures: small torch models that exercise the ops the pipeline must handle."""

import numpy as np
import pytest
import torch


class SmallCNN(torch.nn.Module):
    """conv+BN+ReLU, a residual add, pooling, flatten and a dense head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.conv2(y))
        return self.fc(self.pool(y).flatten(1))


class SmallMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _randomize_bn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Training tests take one core: the test machine is shared and torch would take all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("float32"))
    return model, x


@pytest.fixture
def small_mlp():
    torch.manual_seed(0)
    model = SmallMLP().eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 32)).astype("float32"))
    return model, x


def assert_close(actual, expected, rtol=1e-4):
    """Relative error against the largest reference magnitude (outputs can be near zero)."""
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(np.asarray(actual) - expected).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"

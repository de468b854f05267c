"""Every zoo model compiled for the host matches torch within 1e-4 relative."""

import pytest
import torch

import lastbit
from lastbit.frontend.models import ZOO, get_model
from tests.conftest import assert_close

SMALL = ("lenet5", "resnet20", "mlp", "ffn")
LARGE = tuple(name for name in ZOO if name not in SMALL)


def _check(name: str) -> None:
    # Outputs do not depend on training for this check: no training on first use, and
    # the shipped pretrained weights only for EfficientNet.
    model, x = get_model(name, pretrained=(name == "efficientnet-lite0"))
    artifact = lastbit.compile(model, "x86_64-linux-gnu", (x,), name=name)
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(artifact.run(x.numpy()), expected, rtol=1e-4)


@pytest.mark.parametrize("name", SMALL)
def test_small_zoo_model_matches_torch(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_zoo_model_matches_torch(name):
    _check(name)

"""Fixtures for the autotuning tests: a loopback farm, and kernels that misbehave on purpose."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from autotune_helpers import TinyMLP

from lastbit.autotune.farm import LocalFarm


@pytest.fixture(scope="module")
def farm():
    """A tracker and two single-threaded workers on 127.0.0.1, stopped after the module."""
    with LocalFarm(workers=2, key="test", threads=1) as running:
        yield running


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 64)).astype("float32"))
    return TinyMLP().eval(), x

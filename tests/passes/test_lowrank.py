"""Low-rank splitting: full rank reproduces the layer; ranks, skips and FLOPs are accounted."""

import numpy as np
import pytest
import torch
from graph_runner import run_graph
from torch import nn

from lastbit.frontend import from_torch
from lastbit.passes.flops import layer_flops
from lastbit.passes.lowrank import (
    LowRank,
    LowRankError,
    parse_rank,
    rank_for_energy,
    split_conv,
    split_conv_separable,
    split_dense,
)


class ConvDense(nn.Module):
    """A strided padded 3x3 conv, a 5x3 conv, a 1x1 conv, and two dense layers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(32, 32, (5, 3), padding=(2, 1), dilation=(1, 1))
        self.c3 = nn.Conv2d(32, 16, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        y = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


@pytest.fixture(scope="module")
def model_and_graph():
    torch.manual_seed(0)
    model = ConvDense().eval()
    x = torch.randn(1, 16, 8, 8)
    return model, x, from_torch(model, (x,))


def test_numpy_splits_reproduce_at_full_rank():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((20, 12)).astype(np.float32)
    a, b = split_dense(m, 12)
    np.testing.assert_allclose(a @ b, m, atol=1e-5)
    w = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    first, second = split_conv(w, 8)
    assert first.shape == (8, 5, 3, 3) and second.shape == (8, 8, 1, 1)
    np.testing.assert_allclose(np.einsum("or,rikl->oikl", second[:, :, 0, 0], first), w, atol=1e-5)
    vertical, horizontal = split_conv_separable(w, 15)  # full rank: min(5*3, 8*3)
    assert vertical.shape == (15, 5, 3, 1) and horizontal.shape == (8, 15, 1, 3)
    np.testing.assert_allclose(np.einsum("orx,riy->oiyx", horizontal[:, :, 0, :], vertical[..., 0]), w, atol=1e-5)


def test_rank_for_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(np.zeros(3), 0.5) == 1


@pytest.mark.parametrize("mode", ["kxk-1x1", "separable"])
def test_full_rank_split_reproduces_the_model(model_and_graph, mode):
    model, x, graph = model_and_graph
    split = LowRank(rank=10_000, conv_mode=mode, min_params=0)
    out = split(graph)
    done = {s.layer: s for s in split.splits if not s.skipped}
    assert set(done) == {"c1", "c2", "fc1", "fc2"}
    assert "1x1 conv" in next(s.skipped for s in split.splits if s.layer == "c3")
    assert "p_c1_weight.svd0" in out.params and "p_c1_weight" not in out.params
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_graph(out, x.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_energy_rank_drops_flops_and_reports_them(model_and_graph):
    _, x, graph = model_and_graph
    rng = np.random.default_rng(0)
    params = dict(graph.params)
    u, v = rng.standard_normal((96, 4)), rng.standard_normal((4, 256))
    params["p_fc1_weight"] = (u @ v).astype(np.float32)  # rank 4: energy 1.0 needs rank 4
    low = graph.replace(params=params)
    split = LowRank(energy=0.999)
    out = split(low)
    fc1 = next(s for s in split.splits if s.layer == "fc1")
    assert fc1.rank == 8 and not fc1.skipped  # rank 4, rounded up to a whole SIMD block of 8
    assert out.params["p_fc1_weight.svd0"].shape == (256, 8)
    assert fc1.flops_after == 2 * 8 * (256 + 96) < fc1.flops_before
    flops = layer_flops(out)
    assert flops["fc1.svd0"] + flops["fc1.svd1"] == fc1.flops_after
    assert out.layer_flops_before["fc1"] == fc1.flops_before
    # random full-rank convs need a high rank: left alone, saying why
    c2 = next(s for s in split.splits if s.layer == "c2")
    assert "FLOPs" in c2.skipped
    np.testing.assert_allclose(run_graph(out, x.numpy()), run_graph(low, x.numpy()), rtol=1e-3, atol=1e-4)


def test_flop_budget_and_small_layers(model_and_graph):
    _, _, graph = model_and_graph
    split = LowRank(flops=0.25)
    split(graph)
    by_layer = {s.layer: s for s in split.splits}
    assert "small layer" in by_layer["fc2"].skipped
    for name in ("c1", "c2", "fc1"):
        assert by_layer[name].flops_after <= 0.25 * by_layer[name].flops_before


def test_rank_specs():
    assert parse_rank("auto").energy == 0.9
    assert parse_rank(0.8).energy == 0.8
    assert parse_rank("flops:0.5").flops == 0.5
    assert parse_rank(3).rank == 3
    for bad in (0, 1.5, "flops:2", "lots", True):
        with pytest.raises(LowRankError):
            parse_rank(bad)

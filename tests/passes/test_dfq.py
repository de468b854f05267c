"""DFQ math on a tiny MobileNet-style net: BN folding, cross-layer equalization (function
unchanged, ReLU6 included), bias correction, the depthwise int8 rule."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dfq_models import tiny_net

from lastbit.passes import dfq
from lastbit.passes.pow2_projection import QuantizationError

pytestmark = pytest.mark.usefixtures("one_thread")


def pair_precision(gm, first: str, second: str) -> float:
    r1 = gm.get_submodule(first).weight.detach().abs().flatten(1).amax(1)
    r2 = gm.get_submodule(second).weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    return float(((r1 / r1.max()) * (r2 / r2.max())).sum())


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_fold_and_equalize_keep_the_function(inputs):
    net = tiny_net()
    ref = net(inputs)
    gm = dfq.trace_layers(net)
    assert dfq.fold_batch_norms(gm) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.testing.assert_close(gm(inputs), ref, rtol=1e-5, atol=1e-5)
    pairs = dfq.equalization_pairs(gm)
    # expand → dw and dw → project; the stem feeds a residual too, so it is no pair
    assert [(p.first.target, p.second.target) for p in pairs] == [("expand", "dw"), ("dw", "project")]
    # ReLU6 does clip here, so a plain rescale through it would change the function
    with torch.no_grad():
        assert (net.bn1(net.expand(net.act(net.bn0(net.stem(inputs))))) > 6).any()
    before = pair_precision(gm, "dw", "project")
    assert dfq.cross_layer_equalize(gm) == 2
    torch.testing.assert_close(gm(inputs), ref, rtol=1e-5, atol=1e-5)
    # DFQ's objective: Σ_i (r1_i/R1)(r2_i/R2), the per-tensor precision the pair keeps
    assert pair_precision(gm, "dw", "project") > 1.5 * before
    # the shared ReLU6 became one per-channel clamp per equalized activation
    clamps = [m for m in gm.modules() if isinstance(m, dfq.ChannelClamp)]
    assert len(clamps) == 2 and all(not torch.allclose(c.upper, torch.full_like(c.upper, 6.0)) for c in clamps)
    assert net(inputs).equal(ref)  # the source model is untouched


def test_equalization_balances_ranges(inputs):
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    dfq.cross_layer_equalize(gm, iterations=1)
    dw, project = gm.get_submodule("dw"), gm.get_submodule("project")
    # after the last pair's step, dw's output ranges equal project's input ranges
    r1 = dw.weight.abs().flatten(1).amax(1)
    r2 = project.weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-7)


def test_projection_rule_and_first_last(inputs):
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    none = dfq.project_traced(copy.deepcopy(gm), "ternary", depthwise_int8_error=None)
    assert none.codes == {"stem": "int8", "expand": "ternary", "dw": "ternary", "project": "ternary", "fc": "int8"}
    assert none.depthwise_int8 == []
    every = dfq.project_traced(copy.deepcopy(gm), "ternary", depthwise_int8_error=0.0)
    assert every.depthwise_int8 == ["dw"] and every.codes["dw"] == "int8"
    above = dfq.project_traced(copy.deepcopy(gm), "ternary", depthwise_int8_error=none.relative_error["dw"] + 1e-6)
    assert above.depthwise_int8 == []
    q = copy.deepcopy(gm)
    dfq.project_traced(q, "pow2-4")
    w = q.get_submodule("expand").weight.detach().numpy()
    # every row is α·(power-of-two codes)
    for row in w.reshape(w.shape[0], -1):
        nz = np.abs(row[row != 0])
        ratios = nz / nz.min()
        assert np.allclose(ratios, np.round(ratios)) and set(np.round(ratios)) <= {1.0, 2.0, 4.0}


def test_first_last_kept_float_stay_float_and_leave_the_rest(inputs):
    """Squeeze(first_last_codes=None): stem and fc keep their float weights, and the depthwise
    int8 choice of the other layers still reaches the report."""
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    q = copy.deepcopy(gm)
    report = dfq.project_traced(q, "ternary", keep_first_last=None, depthwise_int8_error=0.0, keep_float=True)
    assert report.codes == {"expand": "ternary", "dw": "int8", "project": "ternary"}
    for name in ("stem", "fc"):
        torch.testing.assert_close(q.get_submodule(name).weight, gm.get_submodule(name).weight, rtol=0, atol=0)


def test_bias_correction_reduces_the_mean_error(inputs):
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    q = copy.deepcopy(gm)
    dfq.project_traced(q, "ternary", keep_first_last=None)
    held_out = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = gm(held_out)
        before = (q(held_out) - ref).mean(0).abs().mean()
        shifts = dfq.bias_correct(gm, q, inputs, batch_size=16)
        after = (q(held_out) - ref).mean(0).abs().mean()
    assert set(shifts) == {"stem", "expand", "dw", "project", "fc"}
    assert after < 0.5 * before
    # the weights stay on their codes (only biases move without rescale)
    assert len(torch.unique(q.get_submodule("expand").weight.abs()[0])) <= 2


@pytest.mark.parametrize("rescale", [True, "ls"])
def test_rescale_keeps_codes_and_lowers_the_error(inputs, rescale):
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    plain = copy.deepcopy(gm)
    dfq.project_traced(plain, "ternary", keep_first_last=None)
    corrected = copy.deepcopy(plain)
    dfq.bias_correct(gm, corrected, inputs)
    q = copy.deepcopy(gm)
    report = dfq.project_traced(q, "ternary", keep_first_last=None)
    dfq.bias_correct(gm, q, inputs, rescale=rescale, projection=report)
    codes, alpha = report.arrays["project"]
    assert torch.equal(q.get_submodule("project").weight,
                       torch.from_numpy(alpha) * torch.from_numpy(codes.astype(np.float32)))  # still α·q exactly
    held_out = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = gm(held_out)
        err = (q(held_out) - ref).pow(2).mean()
        assert err < (plain(held_out) - ref).pow(2).mean()
        if rescale == "ls":  # the least-squares gain beats bias correction alone
            assert err < (corrected(held_out) - ref).pow(2).mean()


def test_untraceable_model_is_named():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(QuantizationError, match="Branchy"):
        dfq.trace_layers(Branchy())


def test_gptq_requantization_keeps_exact_codes(inputs):
    gm = dfq.trace_layers(tiny_net())
    dfq.fold_batch_norms(gm)
    held_out = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    errors = {}
    for requantize in (False, True):
        q = copy.deepcopy(gm)
        report = dfq.project_traced(q, "pow2-4", keep_first_last=None)
        dfq.bias_correct(gm, q, inputs, projection=report, requantize=requantize)
        with torch.no_grad():
            errors[requantize] = float((q(held_out) - gm(held_out)).pow(2).mean())
        # still α·codes on pow2-4, exactly, with the α the projection chose
        for name in ("expand", "project"):
            codes, alpha = report.arrays[name]
            assert set(np.unique(np.abs(codes))) <= {0, 1, 2, 4}
            assert torch.equal(q.get_submodule(name).weight,
                               torch.from_numpy(alpha) * torch.from_numpy(codes.astype(np.float32)))
    # GPTQ's error feedback does not pay on this tiny net (8- and 24-wide layers, coarse pow2
    # steps; see benchmarks/datafree_accuracy.py for EfficientNet), but it stays in range
    assert errors[True] < 2 * errors[False]


def test_asymmetric_requantization_absorbs_upstream_error():
    """With the first layer's error in its input, re-picking the second layer's codes against the
    fp32 network's output (asymmetric) leaves less output error than against its own weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 8))
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=gen)
    calib, held_out = (torch.randn(n, 16, generator=gen) @ mix for n in (1024, 1024))
    gm = dfq.trace_layers(net)
    errors = {}
    for mode in ("symmetric", "asymmetric"):
        q = copy.deepcopy(gm)
        report = dfq.project_traced(q, "ternary", keep_first_last=None)
        dfq.bias_correct(gm, q, calib, batch_size=256, projection=report, requantize=mode)
        with torch.no_grad():
            errors[mode] = [float((q(x) - gm(x)).pow(2).mean()) for x in (calib, held_out)]
        codes, alpha = report.arrays["2"]  # still exactly α·codes on the code set
        assert set(np.unique(codes)) <= {-1, 0, 1}
        exact = torch.from_numpy(alpha) * torch.from_numpy(codes.astype(np.float32))
        assert torch.equal(q.get_submodule("2").weight, exact)
    assert errors["asymmetric"][0] < 0.8 * errors["symmetric"][0], errors
    assert errors["asymmetric"][1] < 0.8 * errors["symmetric"][1], errors
    with pytest.raises(QuantizationError, match="requantize"):
        dfq.bias_correct(gm, copy.deepcopy(gm), calib, requantize="both")


def test_gptq_codes_beat_rounding_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated inputs
    w = torch.randn(8, 16, generator=gen)
    alpha = w.abs().mean(1) / 1.5
    levels = torch.tensor([-4.0, -2, -1, 0, 1, 2, 4])
    rounded = torch.stack([dfq._nearest_level(w[:, j] / alpha, levels) for j in range(16)], 1)
    q = dfq.gptq_codes(w, x.T @ x, alpha, levels).float()
    assert set(q.unique().tolist()) <= set(levels.tolist())
    err_gptq = ((w - alpha[:, None] * q) @ x.T).pow(2).sum()
    err_round = ((w - alpha[:, None] * rounded) @ x.T).pow(2).sum()
    assert err_gptq < 0.8 * err_round

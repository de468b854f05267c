"""Design-space exploration of the accelerator: per-layer cost agrees with compiling and
simulating the layer in full, digit planes compute int8 layers exactly on the shift-add
array, the sweep's Pareto front is the brute-force one, the joint search finds a toy's known
optimum, and bad sweep specs are one clear error."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

from lastbit.codegen import quant_reference as qr
from lastbit.codegen.accel import preset
from lastbit.codegen.accel.compiler import AccelCompileError, ConvLayer, compile_layer
from lastbit.codegen.accel.dse import (
    DseSpecError,
    ModelLayer,
    SweepSpec,
    code_terms,
    digit_planes,
    layer_cost,
    model_cost,
    pareto_front,
    repeat_input,
    sweep,
)
from lastbit.codegen.accel.energy import accelerator_area_mm2, estimate_energy
from lastbit.codegen.accel.functional_sim import run_layer
from lastbit.codegen.accel.joint_search import joint_search, pareto_choices, projection_proxy
from lastbit.codegen.accel.timing_sim import simulate_timing
from lastbit.passes.pow2_projection import QuantizationError, code_set, project_pow2

SMALL = replace(preset("small"), name="t")
CONV = ConvLayer("c", 1, 5, 9, 7, 11, (3, 3), (1, 1), (1, 1, 1, 1), relu=True)
STRIDED = ConvLayer("s", 1, 12, 8, 8, 20, (3, 3), (2, 2), (1, 1, 1, 1))
DENSE = ConvLayer.dense("fc", 3, 40, 10)


def _full_cost(layer, codes, config):
    """Compile with weights and simulate: what layer_cost must agree with."""
    terms = code_terms(_set_of(codes), config.pe)
    wide = replace(layer, in_channels=layer.in_channels * terms)
    program = compile_layer(wide, digit_planes(codes, terms) if terms > 1 else codes, config)
    timing = simulate_timing(program.instructions, config, layer.macs)
    return program, timing, estimate_energy(timing, config)


def _set_of(codes):
    return "int8" if np.abs(codes).max() > 64 or not _is_pow2(codes) else "pow2-64"


def _is_pow2(codes):
    mag = np.abs(codes.astype(np.int64))
    return bool(np.all((mag == 0) | ((mag & (mag - 1)) == 0)))


def test_code_terms():
    assert code_terms("ternary", "shift-add") == 1
    assert code_terms("pow2-4", "shift-add") == 1
    assert code_terms("pow2-64", "shift-add") == 1
    assert code_terms("int8", "shift-add") == 5  # e.g. 117 = 64 + 32 + 16 + 4 + 1, no 128 to borrow from
    assert all(code_terms(c, "mac8") == 1 for c in ("ternary", "pow2-4", "int8"))
    with pytest.raises(QuantizationError, match="unknown code set"):
        code_terms("int5", "shift-add")


@pytest.mark.parametrize("layer", [CONV, STRIDED, DENSE], ids=lambda l: l.name)
def test_digit_planes_are_exact_on_the_shift_add_array(layer):
    """int8 codes as power-of-two planes over a repeated input give Σ x·q bit for bit."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (layer.out_channels, layer.in_channels, *layer.kernel)).astype(np.int8)
    x = rng.integers(-127, 128, (layer.batch, layer.in_channels, layer.height, layer.width)).astype(np.int8)
    terms = code_terms("int8", "shift-add")
    planes = digit_planes(codes, terms)
    assert planes.shape == (layer.out_channels, terms * layer.in_channels, *layer.kernel)
    assert _is_pow2(planes) and np.abs(planes).max() <= 64
    assert np.array_equal(planes.reshape(layer.out_channels, terms, -1).sum(1, dtype=np.int64),
                          codes.reshape(layer.out_channels, -1))
    program = compile_layer(replace(layer, in_channels=terms * layer.in_channels), planes, SMALL)
    got = run_layer(program, repeat_input(x, terms))
    want = qr.int_conv2d(x, codes, layer.stride, (layer.padding[0], layer.padding[1]))
    if layer.relu:
        want = np.maximum(want, 0)
    assert np.array_equal(got, want)


def test_digit_planes_refuse_too_few_terms():
    with pytest.raises(AccelCompileError, match="code 117 needs 5"):
        digit_planes(np.full((1, 1, 1, 1), 117, np.int8), 3)


@pytest.mark.parametrize("config", [SMALL, preset("default"), preset("default").mac8_twin()], ids=lambda c: c.name)
@pytest.mark.parametrize("codes_kind", ["pow2", "int8"])
@pytest.mark.parametrize("layer", [CONV, STRIDED, DENSE], ids=lambda l: l.name)
def test_layer_cost_agrees_with_a_full_compile(layer, codes_kind, config):
    rng = np.random.default_rng(2)
    shape = (layer.out_channels, layer.in_channels, *layer.kernel)
    if codes_kind == "pow2":
        codes = (rng.choice([-1, 0, 1], shape) * 2 ** rng.integers(0, 3, shape)).astype(np.int8)
        name = "pow2-4"
    else:
        codes = rng.integers(-127, 128, shape).astype(np.int8)
        codes.flat[0] = 117  # needs all five terms
        name = "int8"
    program, timing, energy = _full_cost(layer, codes, config)
    cost = layer_cost(layer, name, config)
    assert cost.cycles == timing.cycles
    assert cost.dram_bytes == timing.dram_bytes
    assert cost.energy_pj == pytest.approx(energy.total_pj, rel=1e-12)
    assert cost.tiling == program.tiling
    assert cost.passes == (5 if name == "int8" and config.pe == "shift-add" else 1)
    # the cost does not depend on the layer's name or the config's label
    assert layer_cost(replace(layer, name="other"), name, replace(config, name="x")) == cost


def test_layer_cost_errors():
    huge = ConvLayer("big", 1, 4096, 4, 4, 16, (15, 15), padding=(7, 7, 7, 7))
    with pytest.raises(AccelCompileError, match="no tiling"):
        layer_cost(huge, "pow2-4", replace(SMALL, input_kib=1, weight_kib=1))


def _brute_front(points):
    keep = []
    for i, p in enumerate(points):
        if not any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(points) if j != i):
            keep.append(i)
    return keep


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = rng.integers(0, 6, (30, 3)).astype(float)  # many ties and duplicates
        assert pareto_front(pts).tolist() == _brute_front(pts)


TINY_MODEL = [ModelLayer("a", CONV, "pow2-4"), ModelLayer("b", STRIDED, "int8"), ModelLayer("c", DENSE, "ternary")]


def test_sweep_front_is_correct():
    spec = SweepSpec({"rows": (4, 8, 16), "cols": (4, 8, 16), "weight_kib": (4, 32), "dram_bytes_per_cycle": (4, 16),
                      "pe": ("shift-add", "mac8")}, base=SMALL)
    result = sweep(TINY_MODEL, spec)
    assert len(result.rows) == 3 * 3 * 2 * 2 * 2
    feasible = [i for i, r in enumerate(result.rows) if r["feasible"]]
    assert feasible
    pts = np.array([[result.rows[i][k] for k in ("cycles", "energy_pj", "area_mm2")] for i in feasible])
    assert sorted(result.front) == sorted(feasible[j] for j in _brute_front(pts))
    # totals are the per-layer costs summed, and the area is the config's
    row = result.rows[feasible[0]]
    config = next(c for c in spec.configs() if c.name == row["name"])
    costs = [layer_cost(ml.layer, ml.code_set, config) for ml in TINY_MODEL]
    assert row["cycles"] == sum(c.cycles for c in costs)
    assert row["energy_pj"] == pytest.approx(sum(c.energy_pj for c in costs))
    assert row["area_mm2"] == pytest.approx(accelerator_area_mm2(config)["total_mm2"])
    assert result.to_json()["array_shapes"] == len({(r["config"]["rows"], r["config"]["cols"])
                                                    for r in result.rows if r["feasible"]})


def test_sweep_marks_configs_a_layer_does_not_fit():
    big = ModelLayer("big", ConvLayer("big", 1, 256, 4, 4, 16, (15, 15), padding=(7, 7, 7, 7)), "pow2-4")
    result = sweep([big], SweepSpec({"input_kib": (1, 64)}, base=SMALL))
    assert [r["feasible"] for r in result.rows] == [False, True]
    assert "big" in result.rows[0]["reason"] and result.front == [1]


def test_sweep_writes_json_and_png(tmp_path):
    result = sweep(TINY_MODEL, SweepSpec({"rows": (4, 8), "cols": (8,)}, base=SMALL))
    paths = result.write(tmp_path)
    import json

    data = json.loads(paths["json"].read_text())
    assert len(data["table"]) == 2 and data["front"] == result.front
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("axes, message", [
    ({}, "empty"),
    ({"lanes": (8,)}, "sweep axis 'lanes' is not one of"),
    ({"rows": ()}, "has no values"),
    ({"rows": (8, 0)}, "rows: 0 is not a positive integer"),
    ({"rows": (8, 8)}, "repeats a value"),
    ({"pe": ("shift-add", "fp32")}, "pe: 'fp32' is not one of"),
    ({"rows": (3,), "cols": (3,)}, r"sweep point .*not a whole number of bytes"),
    ({"cols": (8,), "input_kib": (1024,)}, r"sweep point .*input_kib=1024"),
])
def test_bad_sweep_specs(axes, message):
    with pytest.raises(DseSpecError, match=message):
        SweepSpec(axes, base=SMALL)


@pytest.mark.parametrize("items, message", [
    (["rows"], "expected AXIS=V1,V2"),
    (["rows=8,x"], "not a list of integers"),
    (["rows=8", "rows=16"], "given twice"),
    (["pe=shift-add,mac9"], "mac9"),
])
def test_bad_sweep_strings(items, message):
    with pytest.raises(DseSpecError, match=message):
        SweepSpec.parse(items, base=SMALL)


def test_sweep_strings_parse():
    spec = SweepSpec.parse(["rows=4,8", "pe=shift-add,mac8"], base=SMALL)
    assert spec.axes == {"rows": (4, 8), "pe": ("shift-add", "mac8")}
    names = [c.name for c in spec.configs()]
    assert len(names) == 4 and names[0].startswith("shift-add-4x8-")
    assert spec.configs()[1].weight_bits == 8


def test_pareto_choices_is_exact():
    rng = np.random.default_rng(4)
    for _ in range(10):
        costs = rng.integers(1, 20, (5, 3)).astype(float)
        proxies = rng.random((5, 3))
        front = pareto_choices(costs, proxies)
        every = [(sum(costs[l][j] for l, j in enumerate(pick)), sum(proxies[l][j] for l, j in enumerate(pick)), pick)
                 for pick in itertools.product(range(3), repeat=5)]
        for budget in np.unique(costs.sum(1))[:3].tolist() + [30.0, 45.0, 100.0]:
            brute = min((p for c, p, _ in every if c <= budget), default=None)
            got = [p for c, p, _ in front if c <= budget]
            if brute is None:
                assert not got
            else:
                assert min(got) == pytest.approx(brute)
        for c, p, pick in front:  # each point is what its choice adds up to
            assert c == pytest.approx(sum(costs[l][j] for l, j in enumerate(pick)))
            assert p == pytest.approx(sum(proxies[l][j] for l, j in enumerate(pick)))


def _brute_joint(layers, configs, proxies, energy_budget=None, area_budget=None, max_proxy=None):
    best = None
    for config in configs:
        area = accelerator_area_mm2(config)["total_mm2"]
        if area_budget is not None and area > area_budget:
            continue
        for pick in itertools.product(*(sorted(proxies[ml.name]) for ml in layers)):
            e = sum(layer_cost(ml.layer, cs, config).energy_pj for ml, cs in zip(layers, pick))
            p = sum(proxies[ml.name][cs] for ml, cs in zip(layers, pick))
            if energy_budget is not None:
                key = (p, e, area) if e <= energy_budget and (max_proxy is None or p <= max_proxy) else None
            else:
                key = (e, area, p) if p <= max_proxy else None
            if key is not None and (best is None or key < best[0]):
                best = (key, config.name, dict(zip((ml.name for ml in layers), pick)))
    return best


def test_joint_search_finds_the_known_optimum():
    configs = SweepSpec({"rows": (4, 8, 16), "cols": (8,), "pe": ("shift-add", "mac8")}, base=SMALL).configs()
    layers = TINY_MODEL
    # a toy proxy: int8 is nearly free for accuracy, ternary costs the most; layer b is the sensitive one
    proxies = {"a": {"ternary": 0.3, "pow2-4": 0.1, "int8": 0.001},
               "b": {"ternary": 3.0, "pow2-4": 1.0, "int8": 0.01},
               "c": {"ternary": 0.2, "pow2-4": 0.05, "int8": 0.002}}
    energies = sorted({sum(layer_cost(ml.layer, cs, c).energy_pj for ml, cs in zip(layers, pick))
                       for c in configs for pick in itertools.product(*(proxies[ml.name] for ml in layers))})
    for budget in (energies[len(energies) // 4], energies[len(energies) // 2]):
        got = joint_search(layers, configs, proxies, energy_budget_pj=budget)
        want = _brute_joint(layers, configs, proxies, energy_budget=budget)
        assert got.best["name"] == want[1] and got.best["code_sets"] == want[2]
        assert got.best["proxy"] == pytest.approx(want[0][0]) and got.best["energy_pj"] <= budget
    area = sorted(accelerator_area_mm2(c)["total_mm2"] for c in configs)[2]
    got = joint_search(layers, configs, proxies, area_budget_mm2=area)  # proxy ≤ the graph's own code sets
    max_proxy = 0.1 + 0.01 + 0.2
    want = _brute_joint(layers, configs, proxies, area_budget=area, max_proxy=max_proxy)
    assert got.budget["max_proxy"] == pytest.approx(max_proxy)
    assert got.best["name"] == want[1] and got.best["code_sets"] == want[2]
    assert got.best["area_mm2"] <= area


def test_joint_search_errors():
    proxies = {"a": {"pow2-4": 0.1}, "b": {"int8": 0.0}, "c": {"ternary": 0.2}}
    with pytest.raises(DseSpecError, match="needs a budget"):
        joint_search(TINY_MODEL, [SMALL], proxies)
    with pytest.raises(DseSpecError, match="energy budget must be a positive"):
        joint_search(TINY_MODEL, [SMALL], proxies, energy_budget_pj=-1.0)
    with pytest.raises(DseSpecError, match="no accuracy proxy for layer"):
        joint_search(TINY_MODEL, [SMALL], {"a": {"pow2-4": 0.1}}, energy_budget_pj=1e9)
    with pytest.raises(QuantizationError, match="unknown code set"):
        joint_search(TINY_MODEL, [SMALL], {**proxies, "a": {"int3": 0.1}}, energy_budget_pj=1e9)
    result = joint_search(TINY_MODEL, [SMALL], proxies, energy_budget_pj=1.0)  # nothing fits 1 pJ
    assert result.best is None and result.per_array[0]["reason"] == "no assignment meets the budget"


def test_projection_proxy():
    w = np.random.default_rng(5).standard_normal((8, 4, 3, 3))
    q, alpha = project_pow2(w, "pow2-4", axis=0)
    want = np.sum((w - alpha * q) ** 2) / np.sum(w ** 2)
    assert projection_proxy(w, "pow2-4") == pytest.approx(want)
    assert projection_proxy(w, "pow2-4", sensitivity=3.0) == pytest.approx(3 * want)
    assert projection_proxy(w, "int8") < projection_proxy(w, "pow2-4") < projection_proxy(w, "ternary")
    assert code_set("pow2-4").bits == 3


def test_model_cost_of_a_float_layer_needs_a_code_set():
    with pytest.raises(AccelCompileError, match="float layer has no code set"):
        model_cost([ModelLayer("f", CONV, None)], SMALL)


def test_model_layers_of_a_graph():
    """Geometry, code sets and fused ReLUs of a quantized graph; float weights of a float one."""
    import torch

    import lastbit
    from lastbit.codegen.accel.dse import model_layers
    from lastbit.passes.quantize_pow2 import QuantizePow2
    from lastbit.pipeline import import_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            z = torch.relu(self.conv2(y) + y[:, :, ::2, ::2])  # the ReLU after a residual add is not fused
            return self.fc(z.mean((2, 3)))

    torch.manual_seed(0)
    model = Block().eval()
    graph = import_model(model, (torch.randn(1, 3, 8, 8),))
    layers, skipped = model_layers(QuantizePow2(lastbit.Squeeze(bits=3))(graph))
    assert skipped == {}
    assert [(ml.name, ml.code_set, ml.layer.relu) for ml in layers] == [
        ("conv1", "int8", True), ("conv2", "pow2-4", False), ("fc", "int8", False)]
    assert layers[0].layer == ConvLayer("conv1", 1, 3, 8, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), relu=True)
    assert layers[1].layer.stride == (2, 2) and layers[1].layer.out_h == 4
    assert layers[2].layer == ConvLayer.dense("fc", 1, 8, 4)
    assert all(ml.weight is None for ml in layers)
    float_layers, _ = model_layers(graph, "pow2-4")
    assert [ml.code_set for ml in float_layers] == ["pow2-4"] * 3
    assert np.array_equal(float_layers[0].weight, model.conv1.weight.detach().numpy())


def test_model_layers_see_what_the_offload_runs():
    """DSE and the offload share one layer planner: every layer the compiler offloads has the
    same geometry and fused ReLU in model_layers, and a layer it leaves on the host (grouped
    conv, asymmetric padding) model_layers leaves out too."""
    import torch

    import lastbit
    from lastbit.codegen.accel import config_for_target
    from lastbit.codegen.accel.dse import model_layers
    from lastbit.codegen.accel.offload import offload_to_accelerator
    from lastbit.passes.quantize_pow2 import QuantizePow2
    from lastbit.pipeline import import_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.conv2(torch.relu(self.grouped(y)))
            return torch.relu(self.fc(y.mean((2, 3))))

    torch.manual_seed(0)
    graph = import_model(Net().eval(), (torch.randn(1, 4, 8, 8),))
    quantized = QuantizePow2(lastbit.Squeeze(bits=3, keep_first_last=False))(graph)
    _, accel = offload_to_accelerator(quantized, config_for_target("accel-sim"))
    offloaded = {layer.name: replace(layer.program.layer, name="") for layer in accel.layers}
    layers, skipped = model_layers(quantized)
    assert {ml.name: replace(ml.layer, name="") for ml in layers} == offloaded
    assert set(skipped) == set(accel.skipped) == {"grouped"}
    assert {ml.name: ml.layer.relu for ml in layers} == {"conv1": True, "conv2": False, "fc": True}


def test_a_code_with_no_power_of_two_sum_is_one_clear_error():
    from lastbit.codegen.accel.compiler import AccelCompileError
    from lastbit.codegen.accel.dse import digit_planes, pow2_terms

    assert pow2_terms(-127) == (1, -64, -64) and pow2_terms(0) == ()
    for code in (-128, 300):  # int8 codes are symmetric: -127..127
        with pytest.raises(AccelCompileError, match=f"weight code {code} .*±127"):
            pow2_terms(code)
    with pytest.raises(AccelCompileError, match="needs 2 power-of-two terms, more than 1"):
        digit_planes(np.array([[3]], np.int8), 1)

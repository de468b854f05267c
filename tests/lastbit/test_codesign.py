"""The co-design search on a toy model with synthetic costs and sensitivities: it finds the
brute-force optimum (a pruned layer and its reader chosen together), reuses cached
measurements, and predicts the unmeasured choices with the cost model."""

import itertools
import json

import numpy as np
import pytest

from lastbit.codesign import (
    CostTable,
    LayerSite,
    choice_drop,
    measure_costs,
    option_tables,
    search,
    site_groups,
)
from lastbit.codesign_cost import CostCache, CostPoint
from lastbit.errors import LastbitError


def _toy_sites():
    codes = ("ternary", "pow2-4", "int8", "fp32")
    a = LayerSite("a", "conv2d", 8, 16, (3, 3), (1, 1), (1, 1), (8, 8), 1, keeps=(1.0, 0.5), kept_channels=(16, 8),
                  ranks=(None, 8), codes=codes)
    b = LayerSite("b", "conv2d", 16, 16, (3, 3), (1, 1), (1, 1), (8, 8), 1, input_from="a", codes=codes)
    c = LayerSite("c", "dense", 16, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, codes=codes)
    return [a, b, c]


def _toy_cost(p: CostPoint) -> dict:
    # MACs scaled by a code-width factor: fewer bits are cheaper, fp32 dearest
    factor = {"ternary": 0.4, "pow2-4": 0.6, "int8": 1.0, "fp32": 2.0}[p.codes]
    return {"latency_ms": p.macs * factor * 1e-6 + 0.01}


_DELTAS = {  # loss change per factor: the synthetic sensitivity
    "a": {("codes", "ternary"): 0.5, ("codes", "pow2-4"): 0.1, ("codes", "int8"): 0.0, ("keep", 0.5): 0.3,
          ("rank", 8): 0.4},
    "b": {("codes", "ternary"): 0.05, ("codes", "pow2-4"): 0.02, ("codes", "int8"): 0.0},
    "c": {("codes", "ternary"): 0.9, ("codes", "pow2-4"): 0.2, ("codes", "int8"): 0.01},
}


def _brute_force(sites, budget, slope):
    best, best_config = np.inf, None
    for combo in itertools.product(*[s.choices() for s in sites]):
        drop = sum(choice_drop(_DELTAS[s.name], ch, slope) for s, ch in zip(sites, combo))
        if drop > budget + 1e-9:
            continue
        cin_b = sites[0].kept_channels[sites[0].keeps.index(combo[0].keep)]
        cost = sum(_toy_cost(p)["latency_ms"] for p in (sites[0].point(combo[0]), sites[1].point(combo[1], cin_b),
                                                       sites[2].point(combo[2])))
        if cost < best:
            best, best_config = cost, combo
    return best, best_config


@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0, 2.0])
def test_search_finds_the_brute_force_optimum(budget):
    sites = _toy_sites()
    groups = site_groups(sites)
    assert sorted(len(g.sites) for g in groups) == [1, 2]  # a and its reader b are one group
    points = {p for g in groups for o in g.options for p in g.points(o)}
    costs = CostTable({p: {**_toy_cost(p), "weight_bytes": float(p.weight_bytes)} for p in points}, set(points))
    slope = 2.0
    tables = option_tables(groups, costs, _DELTAS, slope, "latency_ms")
    found = search(tables, budget, bins=4000)
    expected, combo = _brute_force(sites, budget, slope)
    assert found.cost == pytest.approx(expected)
    assert found.drop <= budget + 1e-9
    assert [found.config[s.name] for s in sites] == list(combo)


class _CountingSource:
    name = "toy/latency"
    metrics = ("latency_ms",)

    def __init__(self):
        self.calls = 0

    def measure(self, point):
        self.calls += 1
        return _toy_cost(point)


def test_measurements_are_cached_and_the_rest_predicted(tmp_path):
    groups = site_groups(_toy_sites())
    source = _CountingSource()
    cache = CostCache(tmp_path / "costs.json")
    table = measure_costs(groups, source, cache, measure_share=0.5, progress=False)
    n_points = len({p for g in groups for o in g.options for p in g.points(o)})
    assert source.calls == len(table.measured) < n_points
    assert len(table.values) == n_points  # every point has a cost: measured or predicted
    assert table.model_scores["latency_ms"]["spearman"] > 0.5  # MACs × code factor is easy to learn
    again = _CountingSource()
    table2 = measure_costs(groups, again, CostCache(tmp_path / "costs.json"), measure_share=0.5, progress=False)
    assert again.calls == 0 and table2.measured == table.measured


def test_a_code_change_measures_again_and_drops_the_old_entries(tmp_path):
    """The cache is keyed by the code's fingerprint: numbers measured by other kernels are
    never reused, and saving forgets them."""
    groups = site_groups(_toy_sites())
    old = CostCache(tmp_path / "costs.json", fingerprint="old-code")
    measure_costs(groups, _CountingSource(), old, measure_share=0.5, progress=False)
    assert old.entries and all("|old-code|" in k for k in old.entries)
    source = _CountingSource()
    new = CostCache(tmp_path / "costs.json", fingerprint="new-code")
    table = measure_costs(groups, source, new, measure_share=0.5, progress=False)
    assert source.calls == len(table.measured) > 0  # nothing taken from the old code's entries
    stored = json.loads((tmp_path / "costs.json").read_text())["entries"]
    assert stored and all("|new-code|" in k for k in stored)


def test_code_fingerprint_follows_the_kernel_sources():
    from lastbit.codesign_cost import code_fingerprint

    assert len(code_fingerprint()) == 16 and code_fingerprint() == code_fingerprint()


def test_restructured_torch_module_matches_the_compiled_structural_squeeze(small_cnn):
    """finetune_config prunes/splits the torch module itself; it must give the model the
    graph passes give, so the fine-tuned weights fit the compiled layers."""
    import torch

    import lastbit
    from lastbit.codesign import restructure_module
    from lastbit.layer_config import LayerChoice, LayerConfig
    from lastbit.pipeline import import_model
    from lastbit.squeeze import Squeeze
    from tests.conftest import assert_close

    model, x = small_cnn
    config = LayerConfig({"conv1": LayerChoice("fp32", keep=0.5), "conv2": LayerChoice("fp32", rank=2)})
    graph = import_model(model, (x,))
    restructured = restructure_module(model, graph, config, lanes=16)
    assert restructured.conv1.out_channels == 4 and restructured.conv2.svd0.out_channels == 2
    art = lastbit.compile(model, "x86_64-linux-gnu", (x,), squeeze=Squeeze(layers=config))
    with torch.no_grad():
        assert_close(art.run(x), restructured(x).numpy(), rtol=1e-4)


def _tiny_arm_groups():
    # one 3×3 conv, int8 vs fp32: both are anchors, so both get measured
    site = LayerSite("conv", "conv2d", 8, 8, (3, 3), (1, 1), (1, 1), (6, 6), 1, codes=("int8", "fp32"))
    return site_groups([site])


@pytest.mark.qemu
def test_arm_cycles_are_counted_under_qemu_and_cached(tmp_path):
    """ArmCycles compiles each choice for aarch64, counts it under qemu (fp32 costs more
    cycles than the int8 kernel), and a rerun takes every value from the cache."""
    from lastbit.codesign_cost import ArmCycles

    source = ArmCycles("aarch64-dotprod-linux-gnu", core="cortex-a76")
    try:
        source.check_tools()
    except Exception as exc:  # noqa: BLE001 - the toolchain is optional on a dev machine
        pytest.skip(str(exc))
    calls = []
    measure = source.measure
    source.measure = lambda p: calls.append(p) or measure(p)
    groups = _tiny_arm_groups()
    table = measure_costs(groups, source, CostCache(tmp_path / "costs.json"), measure_share=1.0, progress=False)
    assert len(calls) == 2 == len(table.measured)
    by_codes = {p.codes: v for p, v in table.values.items()}
    assert by_codes["fp32"]["cycles"] > by_codes["int8"]["cycles"] > 0
    assert by_codes["int8"]["cycles_cortex-a53"] >= by_codes["int8"]["cycles"]  # in-order A53: never fewer
    again = ArmCycles("aarch64-dotprod-linux-gnu", core="cortex-a76")
    again.measure = lambda p: pytest.fail("a cached point was measured again")
    table2 = measure_costs(groups, again, CostCache(tmp_path / "costs.json"), measure_share=1.0, progress=False)
    assert {p: v["cycles"] for p, v in table2.values.items()} == {p: v["cycles"] for p, v in table.values.items()}


def test_arm_cycles_without_qemu_is_one_clear_error(monkeypatch):
    from lastbit.codesign_cost import ArmCycles, cost_source
    from lastbit.errors import TargetError
    from lastbit.targets import registry

    source = cost_source("aarch64-linux-gnu")
    assert isinstance(source, ArmCycles) and source.core == "cortex-a53"
    monkeypatch.setattr(registry.shutil, "which", lambda tool: None)
    point = _tiny_arm_groups()[0].points(_tiny_arm_groups()[0].options[0])[0]
    with pytest.raises(TargetError, match=r"aarch64-linux-gnu.*needs .*qemu-aarch64"):
        source.measure(point)


def test_arm_cycles_refuses_a_target_it_cannot_count():
    from lastbit.codesign_cost import ArmCycles

    with pytest.raises(LastbitError, match="x86_64-linux-gnu"):
        ArmCycles("x86_64-linux-gnu")
    with pytest.raises(LastbitError, match="cortex-z9"):
        ArmCycles("aarch64-linux-gnu", core="cortex-z9")



@pytest.mark.parametrize("point", [
    CostPoint("conv2d", 16, 32, (3, 3), (2, 2), (1, 1), (14, 14), 1, "pow2-2"),
    CostPoint("conv2d", 16, 32, (3, 3), (1, 1), (1, 1), (14, 14), 1, "ternary", rank=16),
    CostPoint("dense", 64, 10, codes="int8", bn_relu=False),
])
def test_kernel_prior_names_the_kernels_the_lowering_picks(point):
    """The cost model's prior is the lowering's own choice: the kernels a compiled one-layer
    model reports, in the target's strategy order, and their summed estimate."""
    from lastbit.codegen.quant_lowering import kernel_candidates
    from lastbit.codesign_cost import CostModel, _compile_point
    from lastbit.targets import get_target

    target = "x86_64-linux-gnu"
    artifact, _ = _compile_point(point, target)
    picked = [layer.kernel for layer in artifact.report().layers if layer.bits < 32]
    assert len(picked) == len(point.int_layers()) == (1 if point.rank is None else 2)
    log_cost, first = point.kernel_prior(target)
    assert kernel_candidates(get_target(target), None, point.op)[int(first)] == picked[0]
    assert log_cost > 0
    assert point.kernel_prior(target) == point.kernel_prior(target)  # deterministic features
    fp32 = CostPoint(point.op, point.in_channels, point.out_channels, point.kernel, point.stride, point.padding,
                     point.in_hw, point.batch, "fp32")
    assert fp32.kernel_prior(target)[1] == -1.0
    assert len(CostModel(target=target)._features([point])[0]) == len(point.features()) + 2

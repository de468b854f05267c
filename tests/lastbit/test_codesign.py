"""The co-design search on a toy model with synthetic costs and sensitivities: it finds the
brute-force optimum (a pruned layer and its reader chosen together), reuses cached
measurements, and predicts the unmeasured choices with the cost model."""

import dataclasses
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
    found = search([tables], budget, bins=4000)
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


def _pruned_int8_ternary(model, x, images: int):
    """The small CNN's graph, a configuration that prunes conv1 to half at int8 and makes conv2
    ternary, and ``images`` random labelled images for fine-tuning it."""
    from lastbit.layer_config import LayerChoice, LayerConfig
    from lastbit.pipeline import import_model

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((images, 3, 8, 8)).astype("float32"), rng.integers(0, 10, images))
    config = LayerConfig({"conv1": LayerChoice("int8", keep=0.5), "conv2": LayerChoice("ternary")})
    return import_model(model, (x,)), config, data


def test_finetune_config_trains_with_the_chosen_method(small_cnn):
    """method="ste" fine-tunes the restructured module straight through, "admm" by ADMM: both
    land on the per-layer codes exactly, with different weights; an unknown method is refused."""
    import torch

    from lastbit.codesign import finetune_config

    model, x = small_cnn
    graph, config, data = _pruned_int8_ternary(model, x, images=32)
    tuned = {}
    for method in ("admm", "ste"):
        art = finetune_config(model, x, graph, config, data, epochs=1, lanes=16, method=method, batch_size=16)
        assert all(info.exact for info in art.graph.quant.values())
        assert {i.code_set for i in art.graph.quant.values()} == {"int8", "ternary"}
        assert art.torch_module.conv1.out_channels == 4
        tuned[method] = art.torch_module
    assert not torch.equal(tuned["admm"].conv2.weight, tuned["ste"].conv2.weight)
    with pytest.raises(LastbitError, match="'sgd'"):
        finetune_config(model, x, graph, config, data, method="sgd")


def test_codesign_cli_refuses_bad_fine_tuning_options(tmp_path):
    from click.testing import CliRunner

    from lastbit.cli import main

    result = CliRunner().invoke(main, ["codesign", "resnet8", "--finetune", "ste", "-o", str(tmp_path / "cd")])
    assert result.exit_code == 2 and "--finetune-epochs" in result.output
    assert not (tmp_path / "cd").exists()
    result = CliRunner().invoke(main, ["codesign", "resnet8", "--verify", "2", "--validation-samples", "59600",
                                       "-o", str(tmp_path / "cd")])
    assert result.exit_code == 2 and "train split has only 60000" in result.output
    assert not (tmp_path / "cd").exists()


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


# --- residual channel groups -------------------------------------------------------------------
# stem and b2 produce one channel group (joined by a residual add) that b1 and fc read; b1
# alone produces the group b2 reads.

_RES_DELTAS = {
    "stem": {("codes", "ternary"): 0.5, ("codes", "pow2-4"): 0.1, ("codes", "int8"): 0.0},
    "b1": {("codes", "ternary"): 0.4, ("codes", "pow2-4"): 0.1, ("codes", "int8"): 0.0, ("keep", 0.5): 0.6},
    "b2": {("codes", "ternary"): 0.4, ("codes", "pow2-4"): 0.1, ("codes", "int8"): 0.0},
    "fc": {("codes", "ternary"): 0.9, ("codes", "pow2-4"): 0.2, ("codes", "int8"): 0.0},
    "stem+b2": {("keep", 0.5): 0.1},  # the residual group: cheap to halve, and it shrinks four layers
}


def _residual_toy():
    from lastbit.codesign import ResidualGroup

    codes = ("ternary", "pow2-4", "int8")
    stem = LayerSite("stem", "conv2d", 3, 16, (3, 3), (1, 1), (1, 1), (8, 8), 1, codes=codes)
    b1 = LayerSite("b1", "conv2d", 16, 16, (3, 3), (1, 1), (1, 1), (8, 8), 1, keeps=(1.0, 0.5), kept_channels=(16, 8),
                   codes=codes)
    b2 = LayerSite("b2", "conv2d", 16, 16, (3, 3), (1, 1), (1, 1), (8, 8), 1, input_from="b1", codes=codes)
    fc = LayerSite("fc", "dense", 64, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, codes=codes)  # flattens 4 per channel
    residual = ResidualGroup("stem+b2", 16, ("stem", "b2"), {"b1": 1.0, "fc": 4.0}, keeps=(1.0, 0.5),
                             kept_channels=(16, 8))
    return [stem, b1, b2, fc], [residual]


def _residual_brute_force(sites, budget, slope):
    """Every residual keep × every layer choice, each layer's channels worked out by hand."""
    stem, b1, b2, fc = sites
    best, best_config = np.inf, None
    for kr, *combo in itertools.product((1.0, 0.5), *[s.choices() for s in sites]):
        c_stem, c_b1, c_b2, c_fc = combo
        if c_stem.keep != 1.0 or c_b2.keep != 1.0 or c_fc.keep != 1.0:
            continue
        res = int(16 * kr)
        inner = b1.kept_channels[b1.keeps.index(c_b1.keep)]
        drop = slope * (sum(choice_drop(_RES_DELTAS[s.name], ch, slope=1.0) for s, ch in zip(sites, combo))
                        + (_RES_DELTAS["stem+b2"][("keep", 0.5)] if kr < 1 else 0.0))
        if drop > budget + 1e-9:
            continue
        points = [dataclasses.replace(stem, out_channels=res).point(c_stem),
                  dataclasses.replace(b1, in_channels=res).point(c_b1),
                  dataclasses.replace(b2, out_channels=res).point(c_b2, inner),
                  dataclasses.replace(fc, in_channels=4 * res).point(c_fc)]
        cost = sum(_toy_cost(p)["latency_ms"] for p in points)
        if cost < best:
            best, best_config = cost, (kr, combo)
    return best, best_config


@pytest.mark.parametrize("budget", [0.0, 0.3, 1.0, 3.0])
def test_search_over_residual_keeps_finds_the_brute_force_optimum(budget):
    from lastbit.codesign import combo_tables, residual_combos

    sites, residuals = _residual_toy()
    combos = residual_combos(sites, residuals)
    assert [c.keeps for c in combos] == [(1.0,), (0.5,)]
    points = {p for c in combos for g in c.groups for o in g.options for p in g.points(o)}
    costs = CostTable({p: {**_toy_cost(p), "weight_bytes": float(p.weight_bytes)} for p in points}, set(points))
    slope = 2.0
    found = search(combo_tables(combos, residuals, costs, _RES_DELTAS, slope, "latency_ms"), budget, bins=4000)
    expected, (keep, combo) = _residual_brute_force(sites, budget, slope)
    assert found.cost == pytest.approx(expected) and found.drop <= budget + 1e-9
    # the residual group's keep goes to every layer producing it; the others are the brute force's
    assert found.config["stem"].keep == found.config["b2"].keep == keep
    assert [dataclasses.replace(found.config[s.name], keep=c.keep) for s, c in zip(sites, combo)] == list(combo)
    if budget >= 0.3:
        assert keep == 0.5  # the known optimum halves the residual group


def test_a_residual_keep_without_its_sensitivity_is_an_error():
    from lastbit.codesign import combo_tables, residual_combos

    sites, residuals = _residual_toy()
    combos = residual_combos(sites, residuals)
    points = {p for c in combos for g in c.groups for o in g.options for p in g.points(o)}
    costs = CostTable({p: _toy_cost(p) for p in points}, set(points))
    deltas = {k: v for k, v in _RES_DELTAS.items() if k != "stem+b2"}
    with pytest.raises(LastbitError, match=r"residual group stem\+b2 at keep 0.5"):
        combo_tables(combos, residuals, costs, deltas, 1.0, "latency_ms")


def test_residual_points_are_measured_capped_and_the_rest_predicted(tmp_path):
    from lastbit.codesign import residual_combos

    sites, residuals = _residual_toy()
    combos = residual_combos(sites, residuals)
    base = {p for g in combos[0].groups for o in g.options for p in g.points(o)}
    extra = {p for g in combos[1].groups for o in g.options for p in g.points(o)} - base
    source = _CountingSource()
    table = measure_costs(combos[0].groups, source, CostCache(tmp_path / "costs.json"), measure_share=0.5,
                          progress=False, extra=[combos[1].groups], max_extra=3)
    assert len(table.values) == len(base | extra)  # every point priced, measured or predicted
    assert len(table.measured & extra) == 3 == source.calls - len(table.measured & base)
    again = _CountingSource()  # a rerun takes the same share from the cache
    measure_costs(combos[0].groups, again, CostCache(tmp_path / "costs.json"), measure_share=0.5, progress=False,
                  extra=[combos[1].groups], max_extra=3)
    assert again.calls == 0


class _MacLatency:
    """A fake target: latency = MACs × a code-width factor, no compiling."""

    name = "toy/macs"
    metrics = ("latency_ms",)

    def measure(self, point):
        return _toy_cost(point)


@pytest.fixture
def residual_net():
    import torch

    from tests.passes.prune_models import ResidualNet, randomize

    torch.manual_seed(0)
    return randomize(ResidualNet()), torch.randn(1, 3, 8, 8)


def test_run_codesign_prunes_residual_groups_for_real(residual_net, tmp_path):
    """On a residual net with a budget that never binds, the cheapest point halves the
    residual groups; the config gives each group's producers one keep, round-trips through
    JSON, and the restructured module and the compiled model prune exactly those channels."""
    import torch

    import lastbit
    from lastbit.codesign import restructure_module, run_codesign, uniform_configs
    from lastbit.layer_config import LayerConfig
    from lastbit.squeeze import Squeeze
    from tests.conftest import assert_close

    model, x = residual_net
    rng = np.random.default_rng(0)
    calibration = (rng.standard_normal((64, 3, 8, 8)).astype("float32"), rng.integers(0, 5, 64))
    result = run_codesign(model, x, "x86_64-linux-gnu", calibration, tmp_path, max_drop=1e6,
                          cache_path=tmp_path / "costs.json", codes=("pow2-4", "int8"), ranks=False,
                          progress=False, source=_MacLatency())
    assert {r.name: r.kept_channels for r in result.residuals} == {"stem+c2": (8, 4), "d2+short": (12, 8)}
    assert all(("keep", k) in result.deltas[r.name] for r in result.residuals for k in r.keeps if k < 1)
    config = result.chosen.config
    assert config["stem"].keep == config["c2"].keep == 0.5
    assert config["d2"].keep == config["short"].keep == pytest.approx(8 / 12)
    assert LayerConfig.from_json(tmp_path / "config.json") == config
    stored = json.loads((tmp_path / "pareto.json").read_text())
    assert stored["residual_combinations"] == 4 and stored["residual_groups"]["stem+c2"]["kept_channels"] == [8, 4]
    restructured = restructure_module(model, result.graph, config, lanes=result.lanes)
    assert (restructured.stem.out_channels, restructured.c2.out_channels, restructured.c1.in_channels) == (4, 4, 4)
    assert (restructured.d2.out_channels, restructured.short.out_channels, restructured.fc.in_features) == (8, 8, 8)
    fp32 = LayerConfig({n: dataclasses.replace(c, codes="fp32") for n, c in config.layers.items()})
    art = lastbit.compile(model, "x86_64-linux-gnu", (x,), squeeze=Squeeze(layers=fp32))
    with torch.no_grad():
        assert_close(art.run(x), restructure_module(model, result.graph, fp32, lanes=result.lanes)(x).numpy())
    # uniform 30 % pruning is priced with its residual groups pruned as the pass prunes them
    priced = result.uniform["uniform 3-bit + 30% prune"].config
    assert priced["stem"].keep == priced["c2"].keep == 0.5 and priced["d2"].keep == pytest.approx(8 / 12)
    pruned = restructure_module(model, result.graph, uniform_configs(result.sites)["uniform 3-bit + 30% prune"],
                                lanes=result.lanes)
    assert (pruned.stem.out_channels, pruned.d2.out_channels) == (4, 8)



def _toy_tables(slope: float = 2.0):
    from lastbit.codesign import evaluate_config, uniform_configs

    sites = _toy_sites()
    groups = site_groups(sites)
    points = {p for g in groups for o in g.options for p in g.points(o)}
    costs = CostTable({p: {**_toy_cost(p), "weight_bytes": float(p.weight_bytes)} for p in points}, set(points))
    tables = [option_tables(groups, costs, _DELTAS, slope, "latency_ms")]
    uniform = {k: evaluate_config(tables, c) for k, c in uniform_configs(sites).items()}
    return sites, tables, uniform


def _predicted(sites, config, slope: float = 2.0) -> float:
    return sum(choice_drop(_DELTAS[s.name], config[s.name], slope) for s in sites)


def test_verification_tightens_the_budget_until_the_real_drop_fits():
    """Real drop twice the predicted one: the 1-point search's pick loses more than 1 point, the
    loop searches again at half the budget and returns the brute-force optimum of real drop ≤ 1
    (predicted ≤ 0.5), after scoring the uniform baselines and the two searched points once."""
    from lastbit.codesign import verify_search

    sites, tables, uniform = _toy_tables()
    scored = []

    def score(config):
        scored.append(config.to_json())
        return 0.9 - 2 * _predicted(sites, config) / 100

    found = verify_search(tables, uniform, score, 0.9, max_drop=1.0, rounds=3, progress=False)
    first = next(v for v in found.tried if v.label == "search 1")
    assert first.budget == 1.0 and first.drop > 1.0  # the open-loop answer misses the real budget
    expected, combo = _brute_force(sites, 0.5, 2.0)
    assert found.chosen.drop <= 1.0 and found.chosen.candidate.cost == pytest.approx(expected)
    assert [found.chosen.candidate.config[s.name] for s in sites] == list(combo)
    assert len(scored) == len(set(scored)) == len(found.tried)  # nothing fine-tuned twice
    assert [v.label for v in found.tried[:len(uniform)]] == list(uniform)
    assert json.loads(json.dumps(found.to_json()))["chosen"] == found.chosen.label


def test_verification_loosens_the_budget_when_fine_tuning_recovers():
    """Real drop an eighth of the predicted one: the second search runs at 4× the budget (the
    cap; the ratio asks 8×) and finds a cheaper point that still fits."""
    from lastbit.codesign import verify_search

    sites, tables, uniform = _toy_tables()
    found = verify_search(tables, uniform, lambda c: 0.9 - _predicted(sites, c) / 800, 0.9, max_drop=0.5,
                          rounds=2, progress=False)
    searched = [v for v in found.tried if v.budget is not None]
    assert [v.budget for v in searched] == [0.5, 2.0]
    assert searched[1].candidate.cost < searched[0].candidate.cost
    assert found.chosen is searched[1] and found.chosen.drop <= 0.5


def test_verification_keeps_a_uniform_baseline_that_is_cheapest_within_budget():
    """When every searched point loses more than the budget in reality, the answer is the
    cheapest uniform baseline that meets it; when nothing does, there is no answer."""
    from lastbit.codesign import verify_search

    sites, tables, uniform = _toy_tables()
    keys = {c.config.to_json(): name for name, c in uniform.items()}

    def score(config):
        return 0.9 if keys.get(config.to_json()) in ("uniform int8", "uniform 3-bit") else 0.5

    found = verify_search(tables, uniform, score, 0.9, max_drop=1.0, progress=False)
    cheaper = min(("uniform int8", "uniform 3-bit"), key=lambda k: uniform[k].cost)
    assert found.chosen.label == cheaper and found.chosen.drop == 0.0
    assert any(v.budget is not None and v.drop > 1.0 for v in found.tried)
    nothing = verify_search(tables, uniform, lambda c: 0.5, 0.9, max_drop=1.0, progress=False)
    assert nothing.chosen is None and len(nothing.tried) >= len(uniform) + 1
    with pytest.raises(LastbitError, match="at least one search round"):
        verify_search(tables, uniform, score, 0.9, max_drop=1.0, rounds=0)


def test_codesign_verify_writes_the_verified_pick(residual_net, tmp_path, monkeypatch):
    """`codesign --verify`: the uniform baselines and the searched points are fine-tuned on the
    train split minus held-out samples and scored on those; verification.json lists them, and
    config.json and the compiled bundle are the pick's. When nothing fits, config.json goes and
    the error names the closest point."""
    from types import SimpleNamespace

    import click

    from lastbit.cli import _verified_point
    from lastbit.codesign import Verification, Verified, run_codesign
    from lastbit.layer_config import LayerConfig

    model, x = residual_net
    rng = np.random.default_rng(0)
    train = SimpleNamespace(images=rng.standard_normal((160, 3, 8, 8)).astype("float32"),
                            labels=rng.integers(0, 5, 160))
    pick = np.arange(32)
    calibration = (train.images[pick], train.labels[pick])
    result = run_codesign(model, x, "x86_64-linux-gnu", calibration, tmp_path, max_drop=1.0,
                          cache_path=tmp_path / "costs.json", codes=("pow2-4", "int8"), ranks=False, progress=False,
                          source=_MacLatency())
    chosen, real, art = _verified_point(model, x, result, "x86_64-linux-gnu", "latency", train, calibration, pick,
                                        tmp_path, 100.0, 2, 64, 1, "admm", "toy")
    stored = json.loads((tmp_path / "verification.json").read_text())
    assert stored["validation_samples"] == 64 and stored["max_drop"] == 100.0
    assert [t["label"] for t in stored["tried"]][:3] == list(result.uniform)
    assert any(t["search_budget"] == 100.0 for t in stored["tried"])
    # a 100-point budget admits everything: the pick is the most accurate of the points whose
    # whole-model latency, timed on this host, is within 2 % of the cheapest
    assert all(t["measured_cost"] > 0 for t in stored["tried"])
    picked = next(t for t in stored["tried"] if t["label"] == stored["chosen"])
    cheapest = min(t["measured_cost"] for t in stored["tried"])
    assert picked["measured_cost"] <= 1.02 * cheapest
    assert picked["accuracy"] == max(t["accuracy"] for t in stored["tried"] if t["measured_cost"] <= 1.02 * cheapest)
    assert LayerConfig.from_json(tmp_path / "config.json") == chosen.config and chosen is not None
    assert real == f" (real {picked['drop']:.2f} pt after fine-tuning)"
    assert {info.code_set for info in art.graph.quant.values()} == {c.codes for c in chosen.config.layers.values()}

    closest = Verified("uniform int8", result.uniform["uniform int8"], 0.5, 40.0)
    monkeypatch.setattr("lastbit.codesign.verify_search",
                        lambda *a, **k: Verification(0.9, 1.0, [closest], None))
    with pytest.raises(click.ClickException, match="closest, uniform int8, lost 40.00"):
        _verified_point(model, x, result, "x86_64-linux-gnu", "latency", train, calibration, pick, tmp_path, 1.0, 1,
                        64, 1, "admm", "toy")
    assert not (tmp_path / "config.json").exists()


def test_verification_chooses_by_the_measured_whole_model_cost():
    """With ``measure`` the loop compares whole-model costs: when every scored point measures the
    same, they tie and the most accurate one wins (here uniform int8), where the summed
    per-layer predictions alone would pick the cheapest-predicted point."""
    from lastbit.codesign import verify_search

    sites, tables, uniform = _toy_tables()

    def score(config):
        return 0.9 - _predicted(sites, config) / 1000  # every point within budget

    predicted = verify_search(tables, uniform, score, 0.9, max_drop=1.0, progress=False)
    assert predicted.chosen.label != "uniform int8"
    assert predicted.chosen.cost == min(v.candidate.cost for v in predicted.tried)
    flat = verify_search(tables, uniform, score, 0.9, max_drop=1.0, progress=False, measure=lambda c: 1.0)
    assert flat.chosen.label == "uniform int8" and flat.chosen.measured_cost == 1.0
    assert all(t["measured_cost"] == 1.0 for t in flat.to_json()["tried"])
    # 1 % dearer than the cheapest still ties, 3 % does not: uniform int8, the most accurate,
    # drops out at 1.03 and the most accurate of the rest wins
    keys = {uniform[k].config.to_json(): k for k in uniform}
    cost = {"uniform int8": 1.03, "uniform 3-bit": 1.0}

    def measure(config):
        return cost.get(keys.get(config.to_json()), 1.01)

    close = verify_search(tables, uniform, score, 0.9, max_drop=1.0, progress=False, measure=measure)
    rest = [v for v in close.tried if v.label != "uniform int8"]
    assert close.chosen.label != "uniform int8" and close.chosen.accuracy == max(v.accuracy for v in rest)


def test_verification_costs_only_the_points_that_fit():
    """Whole-model costing compiles for the target; points over the real budget cannot be
    chosen, so they are not costed."""
    from lastbit.codesign import verify_search

    sites, tables, uniform = _toy_tables()
    keys = {c.config.to_json(): name for name, c in uniform.items()}
    costed = []

    def measure(config):
        costed.append(keys.get(config.to_json(), "searched"))
        return 1.0

    found = verify_search(tables, uniform, lambda c: 0.9 if keys.get(c.to_json()) == "uniform int8" else 0.5, 0.9,
                          max_drop=1.0, progress=False, measure=measure)
    assert costed == ["uniform int8"] and found.chosen.label == "uniform int8"
    assert [v.measured_cost for v in found.tried if v.label != "uniform int8"] == [None] * (len(found.tried) - 1)


def test_finetune_config_recovers_in_float_on_a_share_of_the_images_first(small_cnn, monkeypatch):
    """The first ``recover`` share of the labelled images trains the restructured (pruned)
    module in float, the rest fine-tunes it onto the codes: disjoint, together all of them.
    X alone (data-free) trains nothing; a share outside [0, 1) is refused by name."""
    import lastbit
    from lastbit.codesign import finetune_config
    from lastbit.passes import prune_finetune

    model, x = small_cnn
    graph, config, data = _pruned_int8_ternary(model, x, images=40)
    seen = {}
    real_finetune, real_compile = prune_finetune.finetune, lastbit.compile

    def spy_finetune(module, part, epochs, **kw):
        seen["float"] = (module.conv1.out_channels, part[0].copy())
        return real_finetune(module, part, epochs, **kw)

    def spy_compile(module, target, example, **kw):
        seen["codes"] = kw["squeeze"].data
        return real_compile(module, target, example, **kw)

    monkeypatch.setattr(prune_finetune, "finetune", spy_finetune)
    monkeypatch.setattr(lastbit, "compile", spy_compile)
    finetune_config(model, x, graph, config, data, lanes=16, recover=0.25, batch_size=8)
    channels, float_images = seen["float"]
    assert channels == 4  # the pruned module recovers, not the original
    np.testing.assert_array_equal(float_images, data[0][:10])
    np.testing.assert_array_equal(seen["codes"][0], data[0][10:])
    np.testing.assert_array_equal(seen["codes"][1], data[1][10:])
    seen.clear()
    finetune_config(model, x, graph, config, data[0][:8], lanes=16)  # calibration only
    assert "float" not in seen and seen["codes"].shape[0] == 8
    with pytest.raises(LastbitError, match="recover must be"):
        finetune_config(model, x, graph, config, data, recover=1.0)

"""Cost-based kernel choice (codegen/kernel_cost.py): where costs come from, and that the
lowering takes the cheapest accepted candidate and says why it passed the others over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lastbit.codegen import kernel_cost
from lastbit.codegen.kernels import IntLayer
from lastbit.squeeze import Squeeze

ARM = "aarch64-linux-gnu"


def _dense(cs="ternary", act_bits=2, unsigned=True):
    return IntLayer("dense", cs, 2, (1, 512), (256, 512), act_bits=act_bits, act_unsigned=unsigned)


def test_table_rows_win_over_the_analytic_estimate():
    table = {ARM: {"int8": {"dense": 2.0}}}
    layer = _dense()
    cost = kernel_cost.kernel_cost("int8", layer, ARM, table)
    assert cost.source == "table" and cost.cost == pytest.approx(2.0 * 512 * 256)
    fallback = kernel_cost.kernel_cost("int8", layer, "x86_64-linux-gnu", table)
    assert fallback.source == "analytic" and fallback.cost == pytest.approx(kernel_cost.ANALYTIC["int8"]["dense"] * 512 * 256)


def test_bitserial_work_grows_with_activation_and_weight_planes():
    base = kernel_cost.work_units("bitserial", _dense())  # 2 activation planes × 2 weight planes
    assert base == 512 * 256
    assert kernel_cost.work_units("bitserial", _dense(act_bits=8, unsigned=False)) == 4 * base
    assert kernel_cost.work_units("bitserial", _dense(cs="binary")) == base / 2
    assert kernel_cost.work_units("int8", _dense(act_bits=8)) == base  # multiplying kernels: MACs


def test_measured_costs_replace_estimates_only_when_every_candidate_has_one():
    layer = _dense()
    table = {ARM: {"int8": {"dense": 1.0}, "bitserial": {"dense": 0.1}}}
    partial = {"int8": 5.0}
    ranked = kernel_cost.rank_candidates(["int8", "bitserial"], layer, ARM, lambda n, _: partial.get(n), table)
    assert [c.kernel for c in ranked] == ["bitserial", "int8"] and ranked[0].source == "table"
    full = {"int8": 1e-6, "bitserial": 2e-6}
    ranked = kernel_cost.rank_candidates(["int8", "bitserial"], layer, ARM, lambda n, _: full[n], table)
    assert [c.kernel for c in ranked] == ["int8", "bitserial"] and ranked[0].source == "measured"
    reason = kernel_cost.passed_over_reason(ranked[1], ranked[0])
    assert reason == "bitserial: 2.0× the cost (measured)"


def test_ties_keep_the_strategy_order():
    table = {ARM: {"int8": {"dense": 1.0}, "reference-int": {"dense": 1.0}}}
    ranked = kernel_cost.rank_candidates(["reference-int", "int8"], _dense(act_bits=8), ARM, table=table)
    assert [c.kernel for c in ranked] == ["reference-int", "int8"]


def test_the_shipped_table_loads_and_has_the_arm_rows():
    table = kernel_cost.load_table()
    assert {"int8", "reference-int", "bitserial"} <= set(table[ARM])
    assert all(not k.startswith("_") for k in table)


def _small_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 10)).eval()
    return model, torch.randn(2, 40)


@pytest.mark.parametrize("cheap", ["reference-int", "bitserial"])
def test_lowering_picks_the_kernel_the_cost_says_is_cheaper(monkeypatch, cheap):
    from lastbit.codegen.quant_lowering import LowerQuantizedLayers
    from lastbit.passes.quantize_pow2 import QuantizePow2
    from lastbit.pipeline import import_model

    model, x = _small_mlp()
    graph = QuantizePow2(Squeeze(codes="ternary", act_bits=2, keep_first_last=False))(import_model(model, (x,)))
    table = {ARM: {"int8": {"dense": 1.0}, "reference-int": {"dense": 2.0}, "bitserial": {"dense": 3.0},
                   "int8-smlal": {"dense": 4.0}}}
    table[ARM][cheap]["dense"] = 0.5
    monkeypatch.setattr(kernel_cost, "load_table", lambda *a: table)
    lowering = LowerQuantizedLayers(ARM)
    lowering(graph)
    choices = list(lowering.choices.values())
    assert len(choices) == 3 and all(c.kernel == cheap for c in choices)
    note = "; ".join(choices[1].passed_over)
    assert "int8: 2.0× the cost (table)" in note  # 1.0 / 0.5
    assert "shift-add: " in note  # passed over too (cost or the reason it cannot serve)


@pytest.mark.parametrize("triple", [ARM, "armv7a-linux-gnueabihf"])
def test_shipped_costs_keep_the_measured_arm_choices(triple):
    """3-bit codes: reference-int before the generic int8 conv (4× the instructions under qemu);
    ternary × 2-bit activations: bitserial before both."""
    conv = IntLayer("conv2d", "pow2-4", 3, (1, 32, 14, 14), (32, 32, 3, 3), padding=(1, 1, 1, 1))
    ranked = kernel_cost.rank_candidates(["reference-int", "int8"], conv, triple)
    assert ranked[0].kernel == "reference-int"
    ternary = IntLayer("conv2d", "ternary", 2, (1, 32, 14, 14), (32, 32, 3, 3), padding=(1, 1, 1, 1),
                       act_bits=2, act_unsigned=True)
    ranked = kernel_cost.rank_candidates(["reference-int", "bitserial", "int8"], ternary, triple)
    assert ranked[0].kernel == "bitserial"


@pytest.mark.parametrize("triple, smlal", [(ARM, "int8-smlal"), ("armv7a-linux-gnueabihf", "int8-smlal-v7"),
                                          ("aarch64-dotprod-linux-gnu", "int8-sdot")])
def test_shipped_costs_put_the_direct_neon_kernels_first_at_3_bits(triple, smlal):
    """The NEON direct convs (codegen/kernels/neon_int.py) counted fewest instructions at 3 bits."""
    conv = IntLayer("conv2d", "pow2-4", 3, (1, 32, 14, 14), (32, 32, 3, 3), padding=(1, 1, 1, 1))
    ranked = kernel_cost.rank_candidates(["reference-int", "int8", "bitserial", smlal], conv, triple)
    assert ranked[0].kernel == smlal


def test_fallbacks_compete_only_when_no_listed_kernel_serves_the_layer():
    import dataclasses

    from lastbit.codegen.quant_lowering import LowerQuantizedLayers
    from lastbit.passes.quantize_pow2 import QuantizePow2
    from lastbit.pipeline import import_model
    from lastbit.targets import get_target

    model, x = _small_mlp()
    graph = QuantizePow2(Squeeze(bits=3, keep_first_last=False))(import_model(model, (x,)))
    target = dataclasses.replace(get_target(ARM), kernels={"dense": ("bitserial",)})
    lowering = LowerQuantizedLayers(target)
    lowering(graph)
    for choice in lowering.choices.values():  # pow2-4 codes: bitserial declines, the cheaper fallback wins
        assert choice.kernel == "int8"
        assert any(p.startswith("bitserial: serves 1–2 bit weights") for p in choice.passed_over)
        assert any(p.startswith("reference-int: ") and "the cost (table)" in p for p in choice.passed_over)


def test_two_term_entries_charge_work_and_elements():
    layer = _dense(cs="pow2-4", act_bits=8)
    table = {ARM: {"int8": {"dense": {"per_unit": 0.5, "per_element": 3.0}}}}
    cost = kernel_cost.kernel_cost("int8", layer, ARM, table)
    assert cost.source == "table" and cost.cost == pytest.approx(0.5 * 512 * 256 + 3.0 * (512 + 256))


def test_fit_rate_recovers_both_terms_and_falls_back_to_one():
    per_unit, per_element = 0.05, 4.0
    shapes = [(1.8e6, 1.4e4), (1.16e8, 5.0e4)]
    counts = [(per_unit * w + per_element * e, w, e) for w, e in shapes]
    fitted = kernel_cost.fit_rate(counts)
    assert fitted["per_unit"] == pytest.approx(per_unit, rel=1e-3)
    assert fitted["per_element"] == pytest.approx(per_element, rel=1e-2)
    assert kernel_cost.fit_rate(counts[:1]) == pytest.approx(counts[0][0] / counts[0][1], abs=1e-3)
    # more instructions per MAC on the small layer than the fit can explain without a negative term
    skewed = [(10.0 * shapes[0][0], *shapes[0]), (0.1 * shapes[1][0], *shapes[1])]
    assert kernel_cost.fit_rate(skewed) == pytest.approx(0.1, abs=1e-3)  # the larger shape's rate


def test_smmla_pays_for_its_padded_tiles():
    """At 0.6× sdot's rate per executed MAC, smmla loses a batch-1 dense (half of each tile is
    a spare row) and wins at batch 2."""
    table = {"aarch64-i8mm-linux-gnu": {"int8-sdot": {"dense": 1.0}, "int8-smmla": {"dense": 0.6}}}
    for rows, winner in ((1, "int8-sdot"), (2, "int8-smmla")):
        layer = IntLayer("dense", "pow2-4", 3, (rows, 512), (256, 512))
        ranked = kernel_cost.rank_candidates(["int8-smmla", "int8-sdot"], layer, "aarch64-i8mm-linux-gnu", table=table)
        assert ranked[0].kernel == winner

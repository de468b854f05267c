"""What one integer kernel costs on one layer, so the lowering can pick the cheapest candidate
of a target's strategy instead of the first one that accepts the layer.

A cost is an estimate of the instructions the kernel executes for the layer (lower is better);
only ratios between candidates of the same layer matter. Three sources, best first:

1. ``measured`` — a caller-supplied function (kernel name, IntLayer) -> cost or None, e.g. a
   tuning database's best run time. It is used only when it has a value for *every* candidate
   of the layer (a time and an instruction estimate are not comparable).
2. The per-target table ``kernel_costs.json`` beside this file, produced by the benchmarks
   (qemu instruction counts on ARM, benchmarks/bitserial_arm.py): instructions per unit of
   work, keyed ``target -> kernel -> shape class`` ("dense", "conv2d").
3. The analytic estimate below, documented per kernel family, for anything the table lacks.

Unit of work (``work_units``): multiply-accumulates (outputs × reduction length) for every
multiplying kernel (``int8-smmla``: the MACs it executes, its pixel pairs and channel blocks
padded, so a batch-1 dense that wastes half of every tile costs twice); for ``bitserial`` the
MACs times activation planes × weight planes / 4, because its work grows with both bit widths (the table's bitserial rows are measured at
2-bit activations × ternary weights, i.e. a factor of exactly 1).

A table entry is a number (instructions per unit of work) or, where a benchmark counted the
kernel on two shapes of the op, ``{"per_unit": a, "per_element": b}``: ``a`` per unit of work
plus ``b`` per input and output element (packing, epilogue, per-tile loop overhead). One rate
measured on a small layer charges that layer's fixed overhead to every MAC and would rank a
kernel with more packing but fewer MACs per instruction (``int8-smmla``) behind ``int8-sdot``
on large layers where it issues half the instructions.

To add a kernel or a target: add rows to ``kernel_costs.json`` (or an ``ANALYTIC`` entry).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COST_TABLE = Path(__file__).with_name("kernel_costs.json")

# Instructions per unit of work when the table has no row, by kernel. Rough and deliberately
# simple, ordered as the kernels were measured on the x86 host (targets/x86_64.py: lut before
# int8-vnni before int8 before shift-add; the VNNI conv before reference-int). A widening int8
# multiply-add does ~8 MACs per ~3 instructions on 128-bit NEON (0.6 incl. overhead); the
# bitserial kernel does 16 output lanes × 8 reduction bits per (AND, CNT, ADD) triple per
# plane pair, ≈ 4 instructions per 128 bit products including loads.
ANALYTIC: dict[str, "float | dict[str, float]"] = {
    # the generic direct int8 conv vectorizes along the output row only: 4.0 per MAC counted on
    # both ARM targets (a 14-wide row), so reference-int stays ahead of it as before
    "int8": {"dense": 0.6, "conv2d": 4.0},
    "int8-vnni": 0.1,
    "int8-vnni-conv": 0.1,
    "reference-int": 0.7,
    "shift-add": 2.0,
    "lut": 0.08,
    "lut-neon": 0.7,
    "lut-neon-v7": 1.0,
    "bitserial": 4 * 4 / 128,
    # direct NEON int8 convs (codegen/kernels/neon_int.py), whole-layer counts of arm_insn_count.py
    "int8-sdot": 0.26,
    "int8-smmla": 0.26,  # per executed MAC (kernel_costs.json has the measured rate)
    # sdot plus a tbl decode per weight vector: never ahead of int8-sdot until measured
    "lut-sdot": 0.4,
    "int8-smlal": 0.37,
    "int8-smlal-v7": 0.65,  # per MAC at 2 activation planes × 2 weight planes
}
UNKNOWN_KERNEL_COST = 1.0  # per MAC: a kernel nobody measured is assumed no better than int8


@dataclass(frozen=True)
class KernelCost:
    """The estimated cost of one kernel on one layer and where the number came from."""

    kernel: str
    cost: float
    source: str  # "measured", "table", "analytic"


def work_units(kernel: str, layer) -> float:
    """The layer's work in the unit the cost rates are per (see the module docstring)."""
    from lastbit.codegen.kernels.common import output_shape

    outputs = int(np.prod(output_shape(layer)))
    macs = float(outputs) * float(np.prod(layer.weight_shape[1:]))
    if kernel == "int8-smmla":  # pays for the pixels and channels its 2×2 tiles pad to
        from lastbit.codegen.kernels import neon_int

        return float(neon_int.executed_macs(neon_int.SMMLA, layer))
    if kernel == "bitserial":
        planes = 1 if layer.code_set == "binary" else 2
        return macs * int(layer.act_bits) * planes / 4
    return macs


def io_elements(layer) -> float:
    """Input plus output elements of the layer (what packing and the epilogue touch)."""
    from lastbit.codegen.kernels.common import output_shape

    return float(np.prod(layer.data_shape)) + float(np.prod(output_shape(layer)))


def fit_rate(counts: "list[tuple[float, float, float]]") -> "float | dict[str, float]":
    """A table entry from ``(instructions, work units, io elements)`` counted on one or more
    shapes: one shape gives a plain rate; two or more a least-squares ``per_unit`` +
    ``per_element`` pair, unless that fit makes a term negative (then the plain rate of the
    largest shape, which the MACs dominate)."""
    if len(counts) > 1:
        insns, work, elements = (np.array(c, dtype=float) for c in zip(*counts))
        (per_unit, per_element), *_ = np.linalg.lstsq(np.stack([work, elements], 1), insns, rcond=None)
        if per_unit > 0 and per_element >= 0:
            return {"per_unit": round(float(per_unit), 4), "per_element": round(float(per_element), 2)}
    insns, work, _ = max(counts, key=lambda c: c[1])
    return round(insns / work, 3)


@functools.lru_cache(maxsize=4)
def load_table(path: str = str(COST_TABLE)) -> dict:
    """``{target: {kernel: {shape class: instructions per unit}}}`` (empty when absent)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    return {t: v for t, v in data.items() if not t.startswith("_")}


def kernel_cost(kernel: str, layer, target: str, table: dict | None = None) -> KernelCost:
    """Cost of ``kernel`` on ``layer`` for the target triple ``target`` (table, else analytic)."""
    table = load_table() if table is None else table
    rate = table.get(target, {}).get(kernel, {}).get(layer.op)
    if isinstance(rate, dict):
        cost = rate["per_unit"] * work_units(kernel, layer) + rate.get("per_element", 0.0) * io_elements(layer)
        return KernelCost(kernel, float(cost), "table")
    if rate is not None:
        return KernelCost(kernel, float(rate) * work_units(kernel, layer), "table")
    rate = ANALYTIC.get(kernel, UNKNOWN_KERNEL_COST)
    if isinstance(rate, dict):
        rate = rate.get(layer.op, UNKNOWN_KERNEL_COST)
    return KernelCost(kernel, rate * work_units(kernel, layer), "analytic")


def rank_candidates(
    names: list[str],
    layer,
    target: str,
    measured: Callable[[str, object], float | None] | None = None,
    table: dict | None = None,
) -> list[KernelCost]:
    """Costs of the (already accepted) candidates ``names``, cheapest first; ties keep the
    strategy's order. ``measured`` replaces every estimate when it knows all candidates."""
    if measured is not None:
        values = [measured(name, layer) for name in names]
        if all(v is not None for v in values):
            costs = [KernelCost(n, float(v), "measured") for n, v in zip(names, values)]
            return sorted(costs, key=lambda c: c.cost)  # sorted() is stable: ties keep the order
    costs = [kernel_cost(name, layer, target, table) for name in names]
    return sorted(costs, key=lambda c: c.cost)


def passed_over_reason(loser: KernelCost, winner: KernelCost) -> str:
    """"int8: 3.4× the cost (table)": one line for the report."""
    ratio = loser.cost / winner.cost if winner.cost > 0 else float("inf")
    return f"{loser.kernel}: {ratio:.1f}× the cost ({loser.source})"

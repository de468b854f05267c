"""Joint search: the model's per-layer code sets and the accelerator's shape chosen together
for one energy or area budget.

For each candidate array, every layer's cost on every code set comes from
``dse.layer_cost``; an accuracy-drop proxy per (layer, code set) is independent of the
array. A multiple-choice knapsack over layers is solved exactly per array by a Pareto DP
(``pareto_choices``: after each layer only the (energy, proxy) pairs no other pair beats in
both are kept, so the final list is the whole trade-off curve and every budget reads off
it exactly, without discretising energy). The best array is then chosen across arrays:

* ``energy_budget_pj``: the least proxy with energy ≤ budget (ties: less energy, less area);
* ``area_budget_mm2`` (and no energy budget): the arrays that fit the area, the least energy
  with proxy ≤ ``max_proxy`` (default: the proxy of the uniform reference assignment, i.e.
  "no less accurate than uniform 3-bit").

The proxy is deliberately plain (``projection_proxy``): the relative weight projection error
‖W − αQ‖² / ‖W‖² with per-channel α, times a per-layer sensitivity when one is given (e.g.
loss change on calibration batches from the co-design search). It ranks choices; it is not
an accuracy. The search takes any proxy table, so a measured one plugs in unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lastbit.codegen.accel.compiler import AccelCompileError
from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.dse import DseSpecError, ModelLayer, _progress, layer_cost, model_cost
from lastbit.codegen.accel.energy import accelerator_area_mm2
from lastbit.passes.pow2_projection import code_set, project_pow2

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CODE_SETS", "JointResult", "joint_search", "pareto_choices", "projection_proxy", "proxy_table"]

DEFAULT_CODE_SETS = ("ternary", "pow2-4", "int8")


def projection_proxy(weight: np.ndarray, codes: str, sensitivity: float = 1.0) -> float:
    """sensitivity · ‖W − αQ‖² / ‖W‖² for the best per-output-channel fit W ≈ α·Q on ``codes``."""
    w = np.asarray(weight, dtype=np.float64)
    q, alpha = project_pow2(w, codes, axis=0)
    norm = float(np.sum(w * w))
    err = float(np.sum((w - alpha.astype(np.float64) * q) ** 2))
    return sensitivity * (err / norm if norm > 0 else 0.0)


def proxy_table(layers: Sequence[ModelLayer], code_sets: Sequence[str] = DEFAULT_CODE_SETS,
                sensitivity: Mapping[str, float] | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """layer name -> code set -> proxy, for layers that carry their float weight (float graphs)."""
    table: dict[str, dict[str, float]] = {}
    for ml in _progress(layers, progress, "accuracy proxy"):
        if ml.weight is None:
            raise AccelCompileError(f"{ml.name}: no float weight to measure a projection error on "
                                    "(pass the float graph, before quantization)")
        s = (sensitivity or {}).get(ml.name, 1.0)
        table[ml.name] = {cs: projection_proxy(ml.weight, cs, s) for cs in code_sets}
    return table


def pareto_choices(costs: Sequence[Sequence[float]], proxies: Sequence[Sequence[float]]
                   ) -> list[tuple[float, float, tuple[int, ...]]]:
    """Every non-dominated (Σ cost, Σ proxy, choice per layer) of a multiple-choice knapsack:
    layer l takes option j at ``costs[l][j]`` and ``proxies[l][j]``. Sorted by cost, proxy
    strictly falling. Exact: a dominated partial sum never extends to a non-dominated total."""
    if len(costs) != len(proxies):
        raise ValueError(f"{len(costs)} cost rows but {len(proxies)} proxy rows")
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for l, (c_row, p_row) in enumerate(zip(costs, proxies)):
        if len(c_row) != len(p_row) or len(c_row) == 0:
            raise ValueError(f"layer {l}: {len(c_row)} costs, {len(p_row)} proxies")
        # an option another one beats in both can be in no optimum: drop it before the product
        live = [j for j in range(len(c_row))
                if not any((c_row[k] <= c_row[j] and p_row[k] <= p_row[j]) and
                           (c_row[k] < c_row[j] or p_row[k] < p_row[j] or k < j) for k in range(len(c_row)) if k != j)]
        merged = sorted(((c + c_row[j], p + p_row[j], pick + (j,)) for c, p, pick in front for j in live),
                        key=lambda t: (t[0], t[1]))
        front = []
        for point in merged:
            if not front or point[1] < front[-1][1]:
                front.append(point)
    return front


@dataclass
class JointResult:
    """The chosen array and per-layer code sets, and each array's best point and curve."""

    budget: dict
    best: dict | None  # None when no array meets the budget
    per_array: list[dict]
    baselines: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {"budget": self.budget, "best": self.best, "baselines": self.baselines, "wall_s": self.wall_s,
                "per_array": [{k: v for k, v in a.items() if k != "curve"} for a in self.per_array],
                "curves": {a["name"]: a["curve"] for a in self.per_array}}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        from lastbit.fileio import atomic_write_bytes, atomic_write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = _plot_joint(self)
        return {"json": atomic_write_json(out_dir / "joint.json", self.to_json()),
                "png": atomic_write_bytes(out_dir / "joint.png", png)}


def joint_search(layers: Sequence[ModelLayer], configs: Sequence[AccelConfig], proxies: Mapping[str, Mapping[str, float]],
                 energy_budget_pj: float | None = None, area_budget_mm2: float | None = None,
                 max_proxy: float | None = None, reference: Mapping[str, str] | None = None,
                 progress: bool = False) -> JointResult:
    """Choose the array (among ``configs``) and each layer's code set (among the keys of
    ``proxies[layer]``) together; see the module docstring for the two budget modes.

    ``reference`` (layer -> code set) is the uniform assignment ``max_proxy`` defaults to
    (default: each layer's own ``code_set``) in the area mode. Arrays a layer does not fit
    on are left out (listed with the reason)."""
    if energy_budget_pj is None and area_budget_mm2 is None:
        raise DseSpecError("joint search needs a budget: energy_budget_pj or area_budget_mm2")
    for what, value in (("energy budget", energy_budget_pj), ("area budget", area_budget_mm2)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise DseSpecError(f"{what} must be a positive number, got {value}")
    names = [ml.name for ml in layers]
    missing = [n for n in names if n not in proxies or not proxies[n]]
    if missing:
        raise DseSpecError(f"no accuracy proxy for layer(s) {', '.join(missing[:5])}")
    options = [sorted(proxies[n]) for n in names]
    for n, opts in zip(names, options):
        for cs in opts:
            code_set(cs)  # an unknown code set is one clear error, before any simulation
    ref = dict(reference) if reference is not None else {ml.name: ml.code_set for ml in layers}
    if max_proxy is None and energy_budget_pj is None:
        unknown = [n for n in names if ref.get(n) not in proxies[n]]
        if unknown:
            raise DseSpecError(f"reference code set of {unknown[0]} ({ref.get(unknown[0])}) has no proxy; give max_proxy")
        max_proxy = float(sum(proxies[n][ref[n]] for n in names))
    start = time.perf_counter()
    per_array = []
    for config in _progress(configs, progress, "joint search"):
        area = accelerator_area_mm2(config)["total_mm2"]
        entry: dict = {"name": config.name, "config": config.to_json(), "area_mm2": area}
        if area_budget_mm2 is not None and area > area_budget_mm2:
            entry.update(feasible=False, reason=f"area {area:.3f} mm² over the budget", curve=[])
            per_array.append(entry)
            continue
        try:
            costs = [[layer_cost(ml.layer, cs, config).energy_pj for cs in opts] for ml, opts in zip(layers, options)]
        except AccelCompileError as err:
            entry.update(feasible=False, reason=str(err), curve=[])
            per_array.append(entry)
            continue
        curve = pareto_choices(costs, [[proxies[n][cs] for cs in opts] for n, opts in zip(names, options)])
        entry["curve"] = [[e, p] for e, p, _ in curve]
        pick = _pick(curve, energy_budget_pj, max_proxy)
        if pick is None:
            entry.update(feasible=False, reason="no assignment meets the budget")
        else:
            e, p, choice = pick
            assignment = {n: opts[j] for n, opts, j in zip(names, options, choice)}
            entry.update(feasible=True, energy_pj=e, proxy=p, code_sets=assignment,
                         cycles=model_cost(layers, config, assignment)["cycles"])
        per_array.append(entry)
    ok = [a for a in per_array if a["feasible"]]
    if energy_budget_pj is not None:
        best = min(ok, key=lambda a: (a["proxy"], a["energy_pj"], a["area_mm2"]), default=None)
    else:
        best = min(ok, key=lambda a: (a["energy_pj"], a["area_mm2"], a["proxy"]), default=None)
    budget = {"energy_budget_pj": energy_budget_pj, "area_budget_mm2": area_budget_mm2, "max_proxy": max_proxy,
              "objective": "min proxy" if energy_budget_pj is not None else "min energy"}
    if best is not None:
        best = {k: v for k, v in best.items() if k != "curve"}
    return JointResult(budget, best, per_array, wall_s=time.perf_counter() - start)


def _pick(curve, energy_budget_pj: float | None, max_proxy: float | None):
    """The budget's point on one array's curve (sorted by energy, proxy falling)."""
    if energy_budget_pj is not None:
        within = [pt for pt in curve if pt[0] <= energy_budget_pj and (max_proxy is None or pt[1] <= max_proxy)]
        return within[-1] if within else None  # the most energy within budget has the least proxy
    good = [pt for pt in curve if pt[1] <= max_proxy * (1 + 1e-12)]
    return good[0] if good else None


def _plot_joint(result: JointResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lastbit.fileio import figure_png

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = sorted((a for a in result.per_array if a.get("curve")), key=lambda a: a.get("energy_pj", np.inf))
    for a in ok[:8]:  # the arrays whose budget point costs least: more would hide the curves
        curve = np.array(a["curve"])
        ax.step(curve[:, 0] / 1e6, curve[:, 1], where="post", alpha=0.7, label=a["name"])
    if result.best is not None:
        ax.scatter([result.best["energy_pj"] / 1e6], [result.best["proxy"]], color="red", zorder=5, s=60,
                   label=f"chosen: {result.best['name']}")
    for label, b in result.baselines.items():
        if b.get("energy_pj") is not None:
            ax.scatter([b["energy_pj"] / 1e6], [b["proxy"]], marker="x", s=60, zorder=5, label=label)
    if result.budget.get("energy_budget_pj"):
        ax.axvline(result.budget["energy_budget_pj"] / 1e6, color="grey", ls="--", lw=1, label="energy budget")
    if result.budget.get("max_proxy") is not None:
        ax.axhline(result.budget["max_proxy"], color="grey", ls=":", lw=1, label="proxy budget")
    ax.set(xlabel="energy per inference (µJ)", ylabel="accuracy-drop proxy Σ ‖W−αQ‖²/‖W‖²", yscale="log",
           title="joint search: per-layer code sets × array (exact per array)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)

"""One model through the accelerator's design-space exploration, as ``lastbit accel-dse`` and
benchmarks/accel_dse.py run it: quantize (data-free), sweep the arrays for the quantized
model, and optionally choose per-layer code sets and the array together for a budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.dse import ModelLayer, SweepResult, SweepSpec, model_cost, model_layers, sweep
from lastbit.codegen.accel.joint_search import DEFAULT_CODE_SETS, JointResult, joint_search, proxy_table
from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

__all__ = ["DseRun", "explore_model", "uniform_baselines"]


@dataclass
class DseRun:
    """The sweep of the quantized model, and the joint search when a budget was given."""

    sweep: SweepResult
    layers: list[ModelLayer]  # the quantized model's layers (their code sets are the reference)
    joint: JointResult | None = None
    proxies: dict = field(default_factory=dict)

    def write(self, out_dir: str | Path, title: str = "accelerator design space") -> dict[str, Path]:
        paths = {f"sweep_{k}": v for k, v in self.sweep.write(out_dir, title).items()}
        if self.joint is not None:
            paths.update({f"joint_{k}": v for k, v in self.joint.write(out_dir).items()})
        return paths


def uniform_baselines(layers: Sequence[ModelLayer], base: AccelConfig, proxies: dict,
                      reference: dict[str, str]) -> dict[str, dict]:
    """Energy, cycles and proxy of uniform settings on ``base`` (and its int8-MAC twin)."""
    names = [ml.name for ml in layers]
    settings = {f"uniform reference ({base.name})": (base, reference),
                f"uniform int8 ({base.name}, digit planes)": (base, dict.fromkeys(names, "int8")),
                f"uniform int8 ({base.name} int8-MAC twin)": (base.mac8_twin(), dict.fromkeys(names, "int8"))}
    out = {}
    for label, (config, assignment) in settings.items():
        cost = model_cost(layers, config, assignment)
        out[label] = {"config": config.name, "energy_pj": cost["energy_pj"], "cycles": cost["cycles"],
                      "area_mm2": cost["area_mm2"],
                      "proxy": sum(proxies[n][assignment[n]] for n in names) if proxies else None}
    return out


def explore_model(graph, squeeze, spec: SweepSpec, energy_budget_pj: float | None = None,
                  area_budget_mm2: float | None = None, max_proxy: float | None = None,
                  code_sets: Sequence[str] = DEFAULT_CODE_SETS, progress: bool = False) -> DseRun:
    """``graph`` is the float model (a Graph); ``squeeze`` the uniform quantization whose
    layers the sweep costs and whose code sets are the joint search's reference."""
    from lastbit.passes.quantize_pow2 import QuantizePow2

    quantized = QuantizePow2(squeeze)(graph)
    layers, skipped = model_layers(quantized)
    result = sweep(layers, spec, progress=progress)
    result.skipped_layers = skipped
    run = DseRun(result, layers)
    if energy_budget_pj is None and area_budget_mm2 is None:
        return run
    float_layers, _ = model_layers(graph)
    by_name = {ml.name: ml for ml in float_layers}
    missing = [ml.name for ml in layers if ml.name not in by_name]
    if missing:
        raise LastbitError(f"layers {missing[:3]} of the quantized graph are not in the float graph")
    float_layers = [by_name[ml.name] for ml in layers]
    reference = {ml.name: ml.code_set for ml in layers}
    sets = list(dict.fromkeys([*code_sets, *reference.values()]))  # the reference's sets are always options
    run.proxies = proxy_table(float_layers, sets, progress=progress)
    run.joint = joint_search(float_layers, spec.configs(), run.proxies, energy_budget_pj=energy_budget_pj,
                             area_budget_mm2=area_budget_mm2, max_proxy=max_proxy, reference=reference,
                             progress=progress)
    run.joint.baselines = uniform_baselines(float_layers, spec.base, run.proxies, reference)
    return run

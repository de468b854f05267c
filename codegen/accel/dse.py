"""Design-space exploration of the accelerator: what one quantized layer costs on one array
(``layer_cost``, the accel-sim cost source of the co-design search), and a sweep of array
shapes, buffer sizes, DRAM bandwidth and PE kind against cycles, energy and area for a
whole model, with its Pareto front.

Cost is the real schedule: the compiler's tiling and instruction stream for the layer
(``compiler.schedule_layer``, no weights needed: the schedule depends on the geometry only)
run through the cycle model and the Horowitz energy table, so it agrees with compiling and
simulating the layer in full. Results are cached per (geometry, code terms, config), so a
network's repeated layers and every code set that maps to the same schedule cost one
simulation.

Code sets the PE does not take directly run as *digit planes*: a shift-add PE applies one
signed power of two (±2^k, k ≤ 6) per weight, so a code that needs T such terms (int8
127 = 64 + 64 − 1 needs 3) is split into T planes of power-of-two codes, stacked along the
input channels, with the input repeated T times: Σ_t P_t·x = q·x exactly
(``digit_planes``/``repeat_input``, checked bit for bit in tests/codegen/test_accel_dse.py).
An int8-MAC PE takes any int8 code in one pass.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lastbit.codegen.accel.compiler import AccelCompileError, ConvLayer, Tiling, schedule_layer
from lastbit.codegen.accel.config import PE_KINDS, AccelConfig, AccelConfigError, preset
from lastbit.codegen.accel.energy import accelerator_area_mm2, estimate_energy
from lastbit.codegen.accel.timing_sim import simulate_timing
from lastbit.passes.pow2_projection import CodeSet, code_set

log = logging.getLogger(__name__)

__all__ = ["DseSpecError", "LayerCost", "ModelLayer", "SweepResult", "SweepSpec", "code_terms", "digit_planes",
           "layer_cost", "model_layers", "pareto_front", "repeat_input", "sweep"]

_MAX_SHIFT = 6  # the shift-add PE's largest shift (4-bit field: sign + e, value ±2^(e-1))


class DseSpecError(AccelConfigError):
    """A sweep specification is malformed: unknown axis, empty or invalid values."""


# --- code sets on a PE ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _signed_pow2_terms() -> dict[int, tuple[int, ...]]:
    """Shortest sum of signed powers of two (±2^k, k ≤ 6) for every int8 value, by breadth-first
    search from 0 (so each decomposition is one of minimum length)."""
    atoms = [s * (1 << k) for k in range(_MAX_SHIFT + 1) for s in (1, -1)]
    best: dict[int, tuple[int, ...]] = {0: ()}
    frontier = [0]
    while frontier and any(v not in best for v in range(-127, 128)):
        nxt = []
        for v in frontier:
            for a in atoms:
                w = v + a
                if abs(w) <= 255 and w not in best:  # partial sums may leave int8 (64 + 64 − 1)
                    best[w] = best[v] + (a,)
                    nxt.append(w)
        frontier = nxt
    return {v: t for v, t in best.items() if abs(v) <= 127}


def pow2_terms(value: int) -> tuple[int, ...]:
    """The signed powers of two a weight code is run as on the shift-add PE, fewest first."""
    table = _signed_pow2_terms()
    if int(value) not in table:
        raise AccelCompileError(f"weight code {int(value)} is not a sum of signed powers of two 2^k (k ≤ {_MAX_SHIFT}) "
                                "within ±127 (the symmetric int8 codes): the shift-add PE cannot run it")
    return table[int(value)]


def code_terms(codes: str | int | CodeSet, pe: str) -> int:
    """How many passes (digit planes) a layer on ``codes`` takes on a ``pe`` array: 1 on an
    int8-MAC PE; on a shift-add PE the most signed power-of-two terms any level needs."""
    cs = code_set(codes)
    if pe not in PE_KINDS:
        raise AccelConfigError(f"pe {pe!r} is not one of {PE_KINDS}")
    if pe == "mac8":
        return 1
    return max(1, max(len(pow2_terms(v)) for v in cs.levels))


def digit_planes(codes: np.ndarray, terms: int) -> np.ndarray:
    """OIHW int8 ``codes`` as ``terms`` planes of power-of-two codes stacked along the input
    channels ([O, terms·I, KH, KW], plane t at channels t·I … (t+1)·I): plane t holds each
    code's t-th term (0 when it has fewer). Raises when a code needs more than ``terms``."""
    codes = np.asarray(codes)
    flat = codes.reshape(-1).astype(np.int64)
    planes = np.zeros((terms, flat.size), dtype=np.int8)
    for value in np.unique(flat):
        parts = pow2_terms(value)
        if len(parts) > terms:
            raise AccelCompileError(f"code {int(value)} needs {len(parts)} power-of-two terms, more than {terms}")
        where = flat == value
        for t, part in enumerate(parts):
            planes[t, where] = part
    o, i = codes.shape[:2]
    planes = planes.reshape(terms, o, i, *codes.shape[2:])
    return np.ascontiguousarray(np.concatenate(list(planes), axis=1))


def repeat_input(x_q: np.ndarray, terms: int) -> np.ndarray:
    """The NCHW input the digit-plane layer reads: ``x_q`` repeated ``terms`` times along channels."""
    return np.ascontiguousarray(np.concatenate([x_q] * terms, axis=1))


# --- the per-layer cost function -----------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """What one layer on one code set costs on one accelerator (one inference)."""

    cycles: int
    energy_pj: float
    dram_bytes: int
    passes: int  # digit planes: 1 when the PE takes the codes directly
    macs: int  # useful multiply-accumulates of the layer
    pe_pj: float
    sram_pj: float
    dram_pj: float
    tiling: Tiling

    def to_json(self) -> dict:
        return {"cycles": self.cycles, "energy_pj": self.energy_pj, "dram_bytes": self.dram_bytes,
                "passes": self.passes, "macs": self.macs,
                "energy_split_pj": {"pe": self.pe_pj, "sram": self.sram_pj, "dram": self.dram_pj},
                "tiling": vars(self.tiling)}


def _normal(config: AccelConfig) -> AccelConfig:
    """The config without its labels, so equal hardware under two names shares cache entries."""
    return replace(config, name="dse", description="")


@functools.lru_cache(maxsize=65536)
def _cached_cost(geometry: ConvLayer, terms: int, config: AccelConfig) -> LayerCost:
    wide = replace(geometry, in_channels=geometry.in_channels * terms)
    tiling, _, _, program = schedule_layer(wide, config)
    timing = simulate_timing(program, config, geometry.macs)
    energy = estimate_energy(timing, config)
    return LayerCost(timing.cycles, energy.total_pj, timing.dram_bytes, terms, geometry.macs,
                     energy.pe_pj, energy.sram_pj, energy.dram_pj, tiling)


def layer_cost(layer: ConvLayer, codes: str | int | CodeSet, config: AccelConfig) -> LayerCost:
    """Cycles, energy (pJ) and DRAM bytes of ``layer`` with weights on code set ``codes``
    ("ternary", "pow2-4", "int8", a bit width or a CodeSet) on accelerator ``config``.

    The schedule is the compiler's (``schedule_layer``) for the layer, widened to its digit
    planes when the PE needs several passes (``code_terms``); cycles from the cycle model,
    energy from ``energy.estimate_energy``. Raises ``AccelCompileError`` when no tiling fits
    the buffers or the geometry is unsupported, ``QuantizationError`` for an unknown code set.
    Cached: call it freely."""
    terms = code_terms(codes, config.pe)
    try:
        return _cached_cost(replace(layer, name=""), terms, _normal(config))
    except AccelCompileError as err:  # the cached call ran without the names: put them back
        reason = str(err).removeprefix(": ").replace(f"'{_normal(config).name}'", f"'{config.name}'")
        raise AccelCompileError(f"{layer.name or 'layer'}: {reason}") from None


# --- a model's layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayer:
    """A conv/dense layer of a Graph as the accelerator sees it."""

    name: str  # the source model's name ("layer1.0.conv1")
    layer: ConvLayer
    code_set: str | None  # the graph's code set; None for a float layer
    weight: np.ndarray | None = field(default=None, compare=False, repr=False)  # float weight, float graphs only


def model_layers(graph, default_code_set: str | None = None) -> tuple[list[ModelLayer], dict[str, str]]:
    """The conv2d/dense layers of ``graph`` (quantized or float) in dataflow order, and the
    layers left out with the reason (grouped/dilated convolution, other layouts).

    Geometry and the fused ReLU come from the offload's own layer planner
    (``offload.layer_geometry`` and ``offload.epilogue_chain``), so a layer is costed here
    exactly as the compiler would offload it. A quantized layer keeps its code set; a float
    one gets ``default_code_set`` and carries its float weight (what an accuracy proxy needs)."""
    from lastbit.codegen.accel.offload import _users, epilogue_chain, layer_geometry
    from lastbit.passes.quantize_pow2 import weighted_layers
    from tvm import relax

    by_codes = {info.codes_param: info for info in graph.quant.values()}
    main = graph.mod["main"]
    params = {var: graph.params[name] for var, name in graph.param_vars().items()}
    var2val = relax.analysis.get_var2val(main)
    users = _users(main)
    found, skipped = [], {}
    for wl in weighted_layers(graph):
        info = by_codes.get(wl.weight)
        name = info.source_name if info else graph.source_names.get(wl.weight, wl.weight)
        name = name.removesuffix(".weight")
        weight = graph.params[wl.weight]
        out_shape = [int(d) for d in wl.relax_var.ty.shape]
        try:
            layer = layer_geometry(wl.call, out_shape, wl.kind, tuple(weight.shape), name, var2val)
        except AccelCompileError as err:
            skipped[name] = f"{err}: not offloaded"
            continue
        steps, _ = epilogue_chain(wl.relax_var, wl.kind, layer.out_channels, out_shape, var2val, users, params)
        layer = replace(layer, relu=any(step == "relu" for step, _ in steps))
        cs = info.code_set if info else default_code_set
        found.append(ModelLayer(name, layer, cs, None if info else np.asarray(weight, np.float32)))
    return found, skipped


# --- the sweep -------------------------------------------------------------------------------------

SWEEP_AXES = ("rows", "cols", "input_kib", "weight_kib", "acc_kib", "dram_bytes_per_cycle", "pe")
# 5 × 4 = 20 array shapes, two weight-buffer sizes, two DRAM bandwidths, both PE kinds
DEFAULT_SWEEP = {"rows": (4, 8, 16, 32, 64), "cols": (8, 16, 32, 64), "weight_kib": (64, 256),
                 "dram_bytes_per_cycle": (8, 32), "pe": ("shift-add", "mac8")}


@dataclass(frozen=True)
class SweepSpec:
    """The grid to sweep: values per axis (the rest from ``base``, the default preset)."""

    axes: Mapping[str, tuple]
    base: AccelConfig = field(default_factory=preset)

    def __post_init__(self) -> None:
        if not self.axes:
            raise DseSpecError("sweep spec is empty: give at least one axis, e.g. rows=8,16,32")
        clean = {}
        for axis, values in self.axes.items():
            if axis not in SWEEP_AXES:
                raise DseSpecError(f"sweep axis {axis!r} is not one of {', '.join(SWEEP_AXES)}")
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            if not values:
                raise DseSpecError(f"sweep axis {axis!r} has no values")
            for v in values:
                if axis == "pe":
                    if v not in PE_KINDS:
                        raise DseSpecError(f"sweep axis pe: {v!r} is not one of {', '.join(PE_KINDS)}")
                elif isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
                    raise DseSpecError(f"sweep axis {axis}: {v!r} is not a positive integer")
            if len(set(values)) != len(values):
                raise DseSpecError(f"sweep axis {axis!r} repeats a value: {list(values)}")
            clean[axis] = tuple(v if axis == "pe" else int(v) for v in values)
        object.__setattr__(self, "axes", clean)
        self.configs()  # every combination must be a valid accelerator: fail now, naming it

    @classmethod
    def parse(cls, items: Iterable[str], base: AccelConfig | None = None) -> SweepSpec:
        """From ``AXIS=V1,V2,…`` strings (the CLI's ``--sweep rows=8,16,32 pe=shift-add,mac8``)."""
        axes: dict[str, tuple] = {}
        for item in items:
            axis, sep, text = str(item).partition("=")
            axis = axis.strip()
            if not sep or not axis or not text.strip():
                raise DseSpecError(f"sweep item {item!r}: expected AXIS=V1,V2,… (axes: {', '.join(SWEEP_AXES)})")
            if axis in axes:
                raise DseSpecError(f"sweep axis {axis!r} given twice")
            values = [v.strip() for v in text.split(",")]
            if axis != "pe":
                try:
                    values = [int(v) for v in values]
                except ValueError:
                    raise DseSpecError(f"sweep axis {axis}: {text!r} is not a list of integers") from None
            axes[axis] = tuple(values)
        return cls(axes, base or preset())

    def configs(self) -> list[AccelConfig]:
        names = list(self.axes)
        out = []
        for combo in itertools.product(*(self.axes[a] for a in names)):
            values = dict(zip(names, combo))
            pe = values.get("pe", self.base.pe)
            values["weight_bits"] = 4 if pe == "shift-add" else 8
            label = "{pe}-{rows}x{cols}-in{input_kib}-w{weight_kib}-acc{acc_kib}-bw{dram_bytes_per_cycle}".format(
                **{**{f.name: getattr(self.base, f.name) for f in fields(self.base)}, **values})
            try:
                out.append(replace(self.base, name=label, description="", **values))
            except AccelConfigError as err:
                raise DseSpecError(f"sweep point {values}: {err}") from None
        return out


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of ``points`` (n × k, every column minimised): a row
    is dominated when another is ≤ in every column and < in one. Equal rows are both kept."""
    points = np.asarray(points, dtype=np.float64)
    keep = []
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        if not dominated.any():
            keep.append(i)
    return np.array(keep, dtype=np.int64)


@dataclass
class SweepResult:
    """Every swept config with its model totals, and which of them form the Pareto front."""

    rows: list[dict]
    front: list[int]  # indices into rows, sorted by cycles
    wall_s: float
    simulations: int  # distinct (geometry, passes, config) schedules simulated
    layer_count: int
    skipped_layers: dict[str, str] = field(default_factory=dict)

    @property
    def front_rows(self) -> list[dict]:
        return [self.rows[i] for i in self.front]

    def to_json(self) -> dict:
        feasible = [r for r in self.rows if r["feasible"]]
        shapes = {(r["config"]["rows"], r["config"]["cols"]) for r in feasible}
        return {"objectives": ["cycles", "energy_pj", "area_mm2"], "configs": len(self.rows),
                "feasible_configs": len(feasible), "array_shapes": len(shapes), "layers": self.layer_count,
                "skipped_layers": self.skipped_layers, "simulations": self.simulations, "wall_s": self.wall_s,
                "front": self.front, "pareto": self.front_rows, "table": self.rows}

    def write(self, out_dir: str | Path, title: str = "accelerator design space") -> dict[str, Path]:
        """``dse.json`` (front and full table) and ``dse.png`` into ``out_dir``, each atomically."""
        from lastbit.fileio import atomic_write_bytes, atomic_write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = _plot_sweep(self, title)
        paths = {"json": atomic_write_json(out_dir / "dse.json", self.to_json())}
        paths["png"] = atomic_write_bytes(out_dir / "dse.png", png)
        return paths


def model_cost(layers: Sequence[ModelLayer], config: AccelConfig,
               code_sets: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Totals of ``layers`` run one after another on ``config`` (each on its code set, or the
    one ``code_sets`` names for it). Raises ``AccelCompileError`` naming the layer that does not fit."""
    cycles = dram = macs = 0
    energy = pe_pj = sram_pj = dram_pj = 0.0
    for ml in layers:
        cs = (code_sets or {}).get(ml.name, ml.code_set)
        if cs is None:
            raise AccelCompileError(f"{ml.name}: float layer has no code set (give one)")
        c = layer_cost(replace(ml.layer, name=ml.name), cs, config)
        cycles += c.cycles
        dram += c.dram_bytes
        macs += c.macs
        energy += c.energy_pj
        pe_pj, sram_pj, dram_pj = pe_pj + c.pe_pj, sram_pj + c.sram_pj, dram_pj + c.dram_pj
    area = accelerator_area_mm2(config)
    return {"cycles": cycles, "latency_ms": cycles / (config.clock_mhz * 1e3), "energy_pj": energy,
            "energy_split_pj": {"pe": pe_pj, "sram": sram_pj, "dram": dram_pj}, "dram_bytes": dram,
            "macs": macs, "pe_utilisation": macs / (cycles * config.pes) if cycles else 0.0,
            "area_mm2": area["total_mm2"], "pe_area_mm2": area["pe_mm2"], "sram_area_mm2": area["sram_mm2"]}


def sweep(layers: Sequence[ModelLayer], configs: Sequence[AccelConfig] | SweepSpec,
          progress: bool = False) -> SweepResult:
    """Cost ``layers`` (a model, each on its own code set) on every config; the Pareto front
    over (cycles, energy, area) among the configs every layer fits on."""
    if isinstance(configs, SweepSpec):
        configs = configs.configs()
    if not layers:
        raise AccelCompileError("the model has no conv2d/dense layer the accelerator could run")
    before = _cached_cost.cache_info().misses
    start = time.perf_counter()
    rows = []
    bar = _progress(configs, progress, "accel-dse sweep")
    for config in bar:
        row: dict[str, Any] = {"name": config.name, "config": config.to_json()}
        try:
            row.update(model_cost(layers, config), feasible=True)
        except AccelCompileError as err:
            row.update(feasible=False, reason=str(err), area_mm2=accelerator_area_mm2(config)["total_mm2"])
        rows.append(row)
    wall = time.perf_counter() - start
    feasible = [i for i, r in enumerate(rows) if r["feasible"]]
    front: list[int] = []
    if feasible:
        pts = np.array([[rows[i]["cycles"], rows[i]["energy_pj"], rows[i]["area_mm2"]] for i in feasible])
        front = sorted((feasible[j] for j in pareto_front(pts)), key=lambda i: rows[i]["cycles"])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return SweepResult(rows, front, wall, _cached_cost.cache_info().misses - before, len(layers))


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="config")


def _plot_sweep(result: SweepResult, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lastbit.fileio import figure_png

    feasible = [r for r in result.rows if r["feasible"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for pe, marker in (("shift-add", "o"), ("mac8", "s")):
        pts = [r for r in feasible if r["config"]["pe"] == pe]
        if not pts:
            continue
        cyc = np.array([r["cycles"] for r in pts]) / 1e6
        en = np.array([r["energy_pj"] for r in pts]) / 1e6
        area = np.array([r["area_mm2"] for r in pts])
        sc = axes[0].scatter(cyc, en, c=area, cmap="viridis", marker=marker, s=22, alpha=0.6, label=pe)
        axes[1].scatter(area, en, c=cyc, cmap="plasma", marker=marker, s=22, alpha=0.6, label=pe)
    front = result.front_rows
    if front:
        axes[0].scatter([r["cycles"] / 1e6 for r in front], [r["energy_pj"] / 1e6 for r in front], facecolors="none",
                        edgecolors="red", s=70, label="Pareto (cycles×energy×area)")
        axes[1].scatter([r["area_mm2"] for r in front], [r["energy_pj"] / 1e6 for r in front], facecolors="none",
                        edgecolors="red", s=70, label="Pareto")
    if feasible:
        fig.colorbar(sc, ax=axes[0], label="area mm²")
    axes[0].set(xscale="log", yscale="log", xlabel="cycles (M)", ylabel="energy (µJ)", title="cycles vs energy")
    axes[1].set(xscale="log", yscale="log", xlabel="area mm² (PE + SRAM)", ylabel="energy (µJ)",
                title="area vs energy (colour: cycles)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: {len(feasible)} configs, {len(front)} on the front")
    fig.tight_layout()
    return figure_png(fig)

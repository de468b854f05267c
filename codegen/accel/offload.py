"""Partition a Graph between the accelerator and the host (bring-your-own-codegen style).

Every quantized conv2d/dense layer (``find_quantized_layers`` finds
``conv2d(x, astype(codes)·α)`` / ``matmul(x, permute_dims(astype(codes)·α))``) is
merged with what directly follows it — a bias add, an inference batch-norm, a ReLU — and
the whole chain is replaced by ``call_dps_packed`` to a packed function registered from
Python: the accelerator's driver. Everything else stays in the Relax graph and is compiled
for the host by the usual pipeline.

The driver follows the integer-path contract (``codegen/quant_reference.py``): the host
quantizes the input to int8, the accelerator computes (Σ x_q·q + bias_q) [max 0] in int32,
the host applies the single float multiply by scale[o] = float32(α'[o]·s_x). Batch-norm is
folded into α' and the bias, never into the codes, so codes stay powers of two; a channel
whose folded α' is negative has its codes and α' negated (the code sets are symmetric), so
the ReLU stays in int32 on the accelerator. That folding is the numpy part of the x86/ARM
integer lowering (``LayerEpilogue`` and ``fold_epilogue`` of ``codegen/quant_lowering.py``),
reused here so both paths compute the same float terms bit for bit. Codes that are not one
power of two (int8) run on a shift-add array as digit planes: the layer is compiled with its
input channels repeated once per signed power-of-two term its codes need (up to 5 for int8,
``dse.digit_planes``), the driver repeats the input, and Σ_t P_t·x = q·x exactly — so int8
layers cost their real extra passes in cycles and energy instead of falling back to the host.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lastbit.codegen import quant_reference as qr
from lastbit.codegen.accel.compiler import (
    AccelCompileError,
    AccelProgram,
    ConvLayer,
    compile_layer,
)
from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.energy import EnergyReport, estimate_energy, pe_energy_pj
from lastbit.codegen.accel.functional_sim import FunctionalSimulator, run_layer
from lastbit.codegen.accel.timing_sim import TimingReport, simulate_timing
from lastbit.graph import Graph

log = logging.getLogger(__name__)

__all__ = ["AccelModule", "OffloadedLayer", "offload_to_accelerator"]

_MODULE_IDS = itertools.count()


@dataclass
class OffloadedLayer:
    """One layer the accelerator runs, with everything its driver needs."""

    name: str
    kind: str  # "conv2d" or "dense"
    program: AccelProgram
    codes: np.ndarray  # OIHW (dense: [N, K, 1, 1])
    alpha: np.ndarray  # α' per output channel, float64 (batch-norm folded in)
    bias: np.ndarray | None  # b' per output channel, float64
    activation_scale: float | None  # calibrated s_x; None: dynamic max|x|/127 per call
    relu: bool
    func_name: str
    timing: TimingReport
    fused: tuple[str, ...] = ()  # the ops merged into it ("bias", "batch_norm", "relu")
    # digit planes: codes that are not one power of two (int8) run as ``terms`` planes of
    # power-of-two codes over the input repeated ``terms`` times (dse.digit_planes); 1: direct
    terms: int = 1

    @property
    def geometry(self) -> ConvLayer:
        """The layer itself (the program's layer reads the input ``terms`` times over)."""
        lay = self.program.layer
        return replace(lay, in_channels=lay.in_channels // self.terms) if self.terms > 1 else lay

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.float32]:
        s_x = qr.activation_scale(x, self.activation_scale)
        return qr.quantize_activation(x, s_x), s_x

    def _as_image(self, x_q: np.ndarray) -> np.ndarray:
        """Dense inputs [M, K] are the [1, K, 1, M] image of a 1×1 convolution."""
        return x_q.T[None, :, None, :] if self.kind == "dense" else x_q

    def _from_image(self, acc: np.ndarray) -> np.ndarray:
        return acc[0, :, 0, :].T if self.kind == "dense" else acc

    def run(self, x: np.ndarray, simulator: FunctionalSimulator | None = None, reference: bool = False) -> np.ndarray:
        """float32 output of the layer for float32 input ``x``: host quantize, accelerator
        integer part (or, with ``reference``, ``quant_reference``), host float multiply."""
        x_q, s_x = self.quantize(x)
        scale = qr.output_scale(self.alpha, s_x)
        bias_q = qr.integer_bias(self.bias, scale, len(scale))
        axis = 1
        if reference:
            lay = self.geometry
            if self.kind == "dense":
                acc = qr.int_dense(x_q, self.codes[:, :, 0, 0])
            else:
                acc = qr.int_conv2d(x_q, self.codes, lay.stride, (lay.padding[0], lay.padding[1]))
            return qr.epilogue(acc, bias_q, scale, relu=self.relu, axis=axis)
        image = self._as_image(x_q)
        if self.terms > 1:
            from lastbit.codegen.accel.dse import repeat_input

            image = repeat_input(image, self.terms)
        total = self._from_image(run_layer(self.program, image, bias_q, simulator))
        # bias and ReLU were applied in int32 on the accelerator: what is left is the multiply
        return qr.epilogue(total, np.zeros_like(bias_q), scale, relu=False, axis=axis)


@dataclass
class AccelModule:
    """The accelerator side of a compiled model: its layers and what running them costs.

    ``reference = True`` makes every driver use ``quant_reference`` instead of the simulator
    (the same host graph around it), which is how tests check the simulator bit for bit."""

    config: AccelConfig
    layers: list[OffloadedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stays on the host
    reference: bool = False
    sim_seconds: float = 0.0
    calls: int = 0
    _simulator: Any = None

    def run_layer(self, index: int, x: np.ndarray) -> np.ndarray:
        if self._simulator is None:
            self._simulator = FunctionalSimulator(self.config)
        start = time.perf_counter()
        out = self.layers[index].run(x, self._simulator, reference=self.reference)
        self.sim_seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def timing(self) -> TimingReport | None:
        """The cycles of one inference on the accelerator (layers run one after another)."""
        reports = [layer.timing for layer in self.layers]
        return sum(reports[1:], reports[0]) if reports else None

    def summary(self, compare_mac8: bool = True) -> dict:
        """Cycles, PE utilisation, DRAM bytes and energy per layer and in total; with
        ``compare_mac8`` the same numbers for the int8-MAC twin of the array (weights int8)."""
        cfg = self.config
        rows, mac8_total, ours_total = [], None, None
        for layer in self.layers:
            energy = estimate_energy(layer.timing, cfg)
            row = {"layer": layer.name, "kind": layer.kind, "kernel": list(layer.program.layer.kernel), "passes": layer.terms,
                   "tiling": vars(layer.program.tiling), "instructions": len(layer.program.instructions),
                   **_numbers(layer.timing, energy)}
            ours_total = energy if ours_total is None else ours_total + energy
            if compare_mac8:
                twin = cfg.mac8_twin()
                program = compile_layer(layer.geometry, layer.codes, twin)  # int8 MACs: one pass
                timing = simulate_timing(program.instructions, twin, layer.geometry.macs)
                twin_energy = estimate_energy(timing, twin)
                row["mac8"] = _numbers(timing, twin_energy)
                mac8_total = twin_energy if mac8_total is None else mac8_total + twin_energy
            rows.append(row)
        total = self.timing()
        out = {"config": cfg.to_json(), "offloaded_layers": len(self.layers), "host_layers": dict(self.skipped),
               "layers": rows}
        if total is not None:
            out["total"] = _numbers(total, ours_total)
            out["pe_pj_per_mac"] = {"shift-add": pe_energy_pj("shift-add"), "mac8": pe_energy_pj("mac8"),
                                    "fp32-mac": pe_energy_pj("fp32-mac")}
            if mac8_total is not None:
                out["mac8_total_energy_pj"] = mac8_total.total_pj
                out["mac8_pe_area_mm2"] = mac8_total.pe_area_mm2
                out["energy_ratio_vs_mac8"] = ours_total.total_pj / mac8_total.total_pj
                out["mac8_dram_bytes"] = int(sum(r["mac8"]["dram_bytes"] for r in rows))
                out["mac8_cycles"] = int(sum(r["mac8"]["cycles"] for r in rows))
        return out


def _numbers(timing: TimingReport, energy: EnergyReport) -> dict:
    return {"cycles": timing.cycles, "latency_ms": timing.latency_ms, "macs": timing.macs,
            "pe_utilisation": timing.pe_utilisation, "dram_bytes": timing.dram_bytes,
            "energy_pj": energy.total_pj, "energy_split_pj": {"pe": energy.pe_pj, "sram": energy.sram_pj,
                                                              "dram": energy.dram_pj},
            "pe_area_mm2": energy.pe_area_mm2}


# --- the graph partition -----------------------------------------------------------------------


def offload_to_accelerator(graph: Graph, config: AccelConfig, tilings: dict | None = None) -> tuple[Graph, AccelModule]:
    """The host graph (offloaded chains replaced by packed calls) and the accelerator module.

    ``tilings``: tuned tilings by compiled layer (``autotune/accel_tuning.load_tilings``);
    other layers take the estimate's.  The packed functions are registered process-wide
    under ``lastbit.accel_sim.<id>.<i>``."""
    import tvm
    from tvm import relax

    from lastbit.passes.quantize_pow2 import find_quantized_layers

    main = graph.mod["main"]
    param_name = graph.param_vars()
    params = {var: graph.params[name] for var, name in param_name.items()}
    var2val = relax.analysis.get_var2val(main)
    users = _users(main)
    codes_source = {info.codes_param: info for info in graph.quant.values()}
    module = AccelModule(config)
    module_id = next(_MODULE_IDS)
    replace_at: dict = {}
    for var, kind, parts in find_quantized_layers(main):
        info = codes_source.get(param_name.get(parts["codes"], ""))
        label = info.source_name.removesuffix(".weight") if info else var.name
        try:
            plan = _plan_layer(var, kind, parts, var2val, users, params, info, config, label, tilings or {})
        except AccelCompileError as err:
            module.skipped[label] = str(err)
            log.info("accel: %s stays on the host: %s", label, err)
            continue
        func_name = f"lastbit.accel_sim.{module_id}.{len(module.layers)}"
        plan["layer"].func_name = func_name
        module.layers.append(plan["layer"])
        # the layer's own argument (the pattern's match would be the expression bound to it)
        replace_at[plan["end"]] = (len(module.layers) - 1, var2val[var].args[0])
        _register_driver(tvm, func_name, module, len(module.layers) - 1)
    if not replace_at:
        return graph, module
    mutator = _offload_mutator()(graph.mod, replace_at, module.layers)
    func = mutator.visit_expr(main)
    mod = graph.mod.functions_items()
    new_mod = tvm.IRModule({gv: (func if gv.name_hint == "main" else f) for gv, f in mod}, attrs=graph.mod.attrs)
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    log.info("accel: %d layer(s) on '%s', %d on the host", len(module.layers), config.name, len(module.skipped))
    return graph.replace(mod=new_mod), module


def _register_driver(tvm, func_name: str, module: AccelModule, index: int) -> None:
    def driver(x, out):
        out.copyfrom(np.ascontiguousarray(module.run_layer(index, x.numpy())))

    tvm.register_global_func(func_name, driver, override=True)


def _users(func) -> dict:
    """Var -> how many bindings (or the function result) use it."""
    from tvm import relax

    counts: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for v in relax.analysis.free_vars(binding.value):
                counts[v] = counts.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        counts[v] = counts.get(v, 0) + 1
    return counts


def _sole_user(var, var2val: dict, users: dict):
    """The (var, call) of the one binding that uses ``var``, if exactly one does."""
    from tvm import relax

    if users.get(var, 0) != 1:
        return None, None
    for v, value in var2val.items():
        if isinstance(value, (relax.Call, relax.TupleGetItem)) and var in relax.analysis.free_vars(value):
            return v, value
    return None, None


def _constant(expr, var2val: dict, params: dict) -> np.ndarray | None:
    """The numpy value of a parameter/constant, possibly through reshape; None if not constant."""
    from tvm import relax

    if expr in params:
        return params[expr]
    if hasattr(expr, "value") and hasattr(expr.value, "numpy") and not isinstance(expr, relax.Var):
        return expr.value.numpy()
    value = var2val.get(expr)
    if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.reshape":
        inner = _constant(value.args[0], var2val, params)
        if inner is not None:
            return inner.reshape([int(d) for d in value.ty.shape])
    return None


def _op(value) -> str:
    return getattr(getattr(value, "op", None), "name", "")


def layer_geometry(call, out_shape: list[int], kind: str, weight_shape: tuple, label: str, var2val: dict) -> ConvLayer:
    """The accelerator's view of one conv2d/dense ``call`` (``weight_shape``: OIHW, dense
    [N, K]), or AccelCompileError saying why the array cannot run it. The one layer planner:
    offloading (``_plan_layer``) and design-space exploration (``dse.model_layers``) both
    see a layer through it, so what DSE costs is what the compiler offloads."""
    data_shape = [int(d) for d in call.args[0].ty.shape]
    if kind == "conv2d":
        attrs = call.attrs
        if int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation):
            raise AccelCompileError(f"grouped or dilated convolution (groups={int(attrs.groups)}, "
                                    f"dilation {[int(d) for d in attrs.dilation]})")
        if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW" \
                or len(data_shape) != 4:
            raise AccelCompileError(f"layout {attrs.data_layout}/{attrs.kernel_layout}, need NCHW/OIHW")
        pad = [int(p) for p in attrs.padding]
        pad = (pad * 4)[:4] if len(pad) == 1 else (pad * 2 if len(pad) == 2 else pad)
        if pad[0] != pad[2] or pad[1] != pad[3]:
            raise AccelCompileError(f"asymmetric padding {pad}")
        return ConvLayer(label, *data_shape, int(weight_shape[0]), tuple(int(k) for k in weight_shape[2:]),
                         tuple(int(s) for s in attrs.strides), tuple(pad))
    if kind == "dense":
        operand = var2val.get(call.args[1])
        transposed = _op(operand) == "relax.permute_dims" and (
            operand.attrs.axes is None or [int(a) for a in operand.attrs.axes] == [1, 0])
        if len(data_shape) != 2 or len(weight_shape) != 2 or not transposed or len(out_shape) != 2:
            raise AccelCompileError(f"dense layer with data {data_shape}, weight {list(weight_shape)}: "
                                    "only x[M, K] @ permute_dims(W[N, K]) is offloaded")
        return ConvLayer.dense(label, data_shape[0], data_shape[1], int(weight_shape[0]))
    raise AccelCompileError(f"{kind} layers are not offloaded")


def epilogue_chain(var, kind: str, channels: int, out_shape: list[int], var2val: dict, users: dict,
                   params: dict) -> tuple[list[tuple[str, Any]], Any]:
    """What directly follows the layer bound to ``var`` and fuses into it, in order —
    ("bias", b[C]), ("batch_norm", (γ, β, mean, var, ε)) for a conv, ("relu", None) — and the
    var that ends the chain. Only constant per-channel terms fuse (a residual add does not)."""
    from tvm import relax

    steps: list[tuple[str, Any]] = []
    end = var
    user, value = _sole_user(end, var2val, users)
    if _op(value) == "relax.add":
        other = value.args[1] if value.args[0].same_as(end) else value.args[0]
        b = _constant(other, var2val, params)
        if b is not None and b.size == channels and _is_channel_vector(b.shape, len(out_shape), 1) \
                and [int(d) for d in user.ty.shape] == out_shape:
            steps.append(("bias", b.reshape(-1)))
            end = user
            user, value = _sole_user(end, var2val, users)
    if kind == "conv2d" and _op(value) == "relax.nn.batch_norm" and int(value.attrs.axis) == 1:
        consts = [_constant(a, var2val, params) for a in value.args[1:5]]
        getter, get_value = _sole_user(user, var2val, users)
        if all(c is not None for c in consts) and isinstance(get_value, relax.TupleGetItem) and get_value.index == 0:
            gamma, beta, mean, variance = consts
            if not bool(value.attrs.scale):
                gamma = np.ones_like(mean)
            if not bool(value.attrs.center):
                beta = np.zeros_like(mean)
            steps.append(("batch_norm", (gamma, beta, mean, variance, float(value.attrs.epsilon))))
            end = getter
            user, value = _sole_user(end, var2val, users)
    if _op(value) == "relax.nn.relu":
        steps.append(("relu", None))
        end = user
    return steps, end


def _plan_layer(var, kind, parts, var2val, users, params, info, config: AccelConfig, label: str,
                tilings: dict) -> dict:
    codes = _constant(parts["codes"], var2val, params)
    alpha = _constant(parts["alpha"], var2val, params)
    if codes is None or alpha is None:
        raise AccelCompileError("codes or α are not constants")
    out_shape = [int(d) for d in var.ty.shape]
    layer = layer_geometry(var2val[var], out_shape, kind, codes.shape, label, var2val)
    if kind == "dense":
        codes = codes[:, :, None, None]
    channels = codes.shape[0]
    # a shift-add PE applies one power of two per pass (int8 codes: up to 5 digit planes); an
    # int8-MAC PE takes any int8 code in one
    terms = 1 if config.pe == "mac8" else _code_terms(codes)
    from lastbit.codegen.quant_lowering import LayerEpilogue, fold_epilogue

    epilogue = LayerEpilogue(alpha=np.broadcast_to(np.asarray(alpha, np.float64).reshape(-1), (channels,)).copy())
    steps, end = epilogue_chain(var, kind, channels, out_shape, var2val, users, params)
    for step, value in steps:  # bias add, batch-norm (conv2d), ReLU
        if step == "bias":
            epilogue.add_bias(value)
        elif step == "batch_norm":
            epilogue.batch_norm(*value)
        else:
            epilogue.relu = True
            epilogue.ops.append("relu")
    relu = epilogue.relu
    try:
        codes, alpha_eff = fold_epilogue(codes, epilogue)
    except ValueError as err:
        raise AccelCompileError(f"cannot fold {'+'.join(epilogue.ops)}: {err}") from err
    bias_eff, fused = epilogue.bias, list(epilogue.ops)
    layer = replace(layer, relu=relu)
    from lastbit.autotune.accel_tuning import layer_key

    if terms > 1:  # int8 codes as power-of-two digit planes over the repeated input
        from lastbit.codegen.accel.dse import digit_planes

        wide = replace(layer, in_channels=layer.in_channels * terms)
        program = compile_layer(wide, digit_planes(np.asarray(codes, np.int8), terms), config,
                                tilings.get(layer_key(wide)))
    else:
        program = compile_layer(layer, codes, config, tilings.get(layer_key(layer)))
    timing = simulate_timing(program.instructions, config, layer.macs)
    scale = info.activation_scale if info is not None else None
    offloaded = OffloadedLayer(label, kind, program, np.asarray(codes, np.int8), alpha_eff, bias_eff, scale, relu,
                               func_name="", timing=timing, fused=tuple(fused), terms=terms)
    return {"layer": offloaded, "end": end}


def _code_terms(codes: np.ndarray) -> int:
    """Passes the shift-add PE needs for these codes: 1 when every code is 0 or ±2^k (k ≤ 6),
    else the most signed power-of-two terms any code needs (int8: up to 5)."""
    from lastbit.codegen.accel.dse import pow2_terms

    return max(1, max(len(pow2_terms(v)) for v in np.unique(np.asarray(codes, np.int64))))


def _is_channel_vector(shape: tuple, ndim: int, axis: int) -> bool:
    full = (1,) * (ndim - len(shape)) + tuple(shape)
    return len(full) == ndim and all(d == 1 for i, d in enumerate(full) if i != axis)


def _offload_mutator():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class OffloadMutator(PyExprMutator):
        """Replaces the binding that ends each offloaded chain by the driver call; the
        chain's earlier bindings become dead and DeadCodeElimination drops them."""

        def __init__(self, mod, replace_at: dict, layers: list):
            super().__init__(mod)
            self.replace_at = replace_at
            self.layers = layers

        def visit_var_binding_(self, binding):
            if binding.var not in self.replace_at:
                super().visit_var_binding_(binding)
                return
            index, data = self.replace_at[binding.var]
            call = relax.call_dps_packed(relax.ExternFunc(self.layers[index].func_name), [self.visit_expr(data)],
                                         relax.TensorType([int(d) for d in binding.var.ty.shape], "float32"))
            if isinstance(binding.var, relax.DataflowVar):
                new = self.builder_.emit(call, binding.var.name)
            else:
                new = self.builder_.emit_output(call, binding.var.name)
            self.set_var_remap(binding.var, new)

    return OffloadMutator

"""Put integer kernels into the graph: every quantized conv2d/dense layer (with the bias add,
inference batch-norm and ReLU that follow it) becomes the integer path of
``codegen/quant_reference.py``, with a kernel chosen per target.

    conv2d/matmul(x, astype(codes) * α) [+ b] [→ batch_norm] [→ relu]
      =>  x_q = int8(clip(rint(x · 1/s_x)))                   call_tir, one opaque PrimFunc
          acc = call_tir(kernel, x_q, *packed codes)          int32, the chosen kernel
          y   = float32((acc + bias_q) [max 0]) · scale       call_tir, one opaque PrimFunc

Batch-norm and the bias fold into the epilogue, not the codes: BN's per-channel factor k
multiplies α (a channel whose α·k is negative gets its codes negated, so the ReLU can stay
in the integer domain), and the shifted bias is rounded to accumulator units.  The epilogue
is its own PrimFunc, never fused with what follows: a residual add fused after its multiply
would let LLVM contract the two into an FMA and the result would depend on the target.
Everything not quantized stays float and goes through the fp32 path.

Which kernel serves a layer: ``Target.kernels[op]`` lists the candidates; of the registered
ones whose ``supports(layer, features)`` returns None, the cheapest by
``codegen/kernel_cost.py`` wins (ties: list order). ``int8`` and ``reference-int`` are the
fallbacks, ranked the same way, when nothing listed serves the layer.  A layer no kernel serves (or one the
rewrite cannot express, e.g. a zero BN scale) keeps the float reference decode; the
:class:`KernelChoice` of every layer says which kernel it got and why others were passed
over, and the report shows it.  The numpy folding math (:func:`fold_epilogue`) is separate
from the IR plumbing and testable without TVM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lastbit.codegen import quant_reference as qr
from lastbit.graph import Graph, QuantInfo

from lastbit.codegen.quant_prims import abs_max_prim_func, epilogue_prim_func, quantize_prim_func, rounds_in_vector

log = logging.getLogger(__name__)

__all__ = [
    "FALLBACK_KERNELS",
    "FLOAT_REFERENCE",
    "FUSED_IO_ATTR",
    "INT_LAYER_ATTR",
    "KERNEL_ATTR",
    "KernelChoice",
    "LayerEpilogue",
    "LowerQuantizedLayers",
    "choose_kernel",
    "fold_epilogue",
    "fused_io_from_json",
    "fused_io_to_json",
    "int_layer_from_json",
    "int_layer_to_json",
    "kernel_candidates",
]

FLOAT_REFERENCE = "reference"  # the decode-to-float path: astype(codes) * α, then fp32 kernels
FALLBACK_KERNELS = ("int8", "reference-int")  # tried after the target's own strategy
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps never merges the function with a neighbour
KERNEL_ATTR = "lastbit.int_kernel"
# The IntLayer and target features a kernel PrimFunc was built and scheduled for (JSON), so the
# tuner can rebuild the unscheduled function (``get_kernel(name).prim_func(layer)``) and the
# schedule phase can re-schedule it from a tuning database record (autotune/tasks.py).
INT_LAYER_ATTR = "lastbit.int_layer"
# On a kernel that does its layer's quantize and epilogue itself (IntKernel.fused_prim_func):
# the kernels.FusedIO it was built with (JSON), for the same rebuild.
FUSED_IO_ATTR = "lastbit.fused_io"


@dataclass(frozen=True)
class KernelChoice:
    """What one quantized layer got: the kernel name (or "reference" for the float decode),
    the epilogue ops folded into it, and why earlier candidates were passed over."""

    layer: str  # the Relax var of the layer in the squeezed graph
    weight: str  # the weight parameter it quantizes (Graph.quant key)
    kernel: str
    epilogue: tuple[str, ...] = ()
    passed_over: tuple[str, ...] = ()  # "shift-add: 1-bit codes only", …
    reason: str = ""  # why the layer kept the float reference, when it did

    @property
    def is_integer(self) -> bool:
        return self.kernel != FLOAT_REFERENCE

    def describe(self) -> str:
        """One line for logs and the report: the kernel, then why others were not used."""
        why = self.reason or "; ".join(self.passed_over)
        return f"{self.kernel} ({why})" if why else self.kernel


# --- the numpy part: folding bias and batch-norm into α and an integer bias ------------------


@dataclass
class LayerEpilogue:
    """The per-output-channel float terms a layer's integer epilogue absorbs:
    ``y = α·acc_units + bias`` (α, bias float64 [C]) then optionally ReLU."""

    alpha: np.ndarray
    bias: np.ndarray | None = None
    relu: bool = False
    ops: list[str] = field(default_factory=list)

    def add_bias(self, b: np.ndarray) -> None:
        b = np.asarray(b, dtype=np.float64)
        self.bias = b if self.bias is None else self.bias + b
        self.ops.append("bias")

    def batch_norm(self, gamma, beta, mean, var, eps: float) -> None:
        """BN(y) = y·k + (β − μ·k), k = γ/√(σ²+ε): scales α and the bias per channel."""
        k = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
        shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * k
        self.alpha = self.alpha * k
        self.bias = shift if self.bias is None else self.bias * k + shift
        self.ops.append("batch_norm")


def fold_epilogue(codes: np.ndarray, epilogue: LayerEpilogue) -> tuple[np.ndarray, np.ndarray]:
    """Codes ([C, ...], output channel first) and α (float64 [C], all ≥ 0) for the integer
    epilogue: a channel whose folded α is negative gets its codes and α negated (the code
    sets are symmetric), so ``max(acc + bias_q, 0)·scale`` is the ReLU of the float layer.
    Raises ValueError when a channel's α is 0 or not finite (a zero BN scale)."""
    alpha = np.asarray(epilogue.alpha, dtype=np.float64)
    bad = ~np.isfinite(alpha) | (alpha == 0)
    if bad.any():
        raise ValueError(f"channel {int(np.argmax(bad))} has folded scale {alpha[bad][0]!r}")
    sign = np.where(alpha < 0, -1, 1).astype(np.int8)
    codes = np.asarray(codes, dtype=np.int8) * sign.reshape((-1,) + (1,) * (codes.ndim - 1))
    return codes.astype(np.int8), np.abs(alpha)


def int_layer_to_json(layer, features: frozenset[str]) -> str:
    """The :data:`INT_LAYER_ATTR` value: every IntLayer field plus the target features the
    kernel's schedule saw (both decide the scheduled code)."""
    import dataclasses
    import json

    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(layer).items()}
    def numpy_scalar(value):  # a shape may hold numpy ints
        return value.item()

    return json.dumps({"layer": fields, "features": sorted(features)}, sort_keys=True, default=numpy_scalar)


def fused_io_to_json(io) -> str:
    """The :data:`FUSED_IO_ATTR` value of a kernels.FusedIO."""
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(io), sort_keys=True)


def fused_io_from_json(text: str):
    """The kernels.FusedIO back from :func:`fused_io_to_json`."""
    import json

    from lastbit.codegen.kernels import FusedIO

    return FusedIO(**json.loads(text))


def int_layer_from_json(text: str):
    """(IntLayer, features) back from :func:`int_layer_to_json`."""
    import json

    from lastbit.codegen.kernels import IntLayer

    data = json.loads(text)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data["layer"].items()}
    return IntLayer(**fields), frozenset(data["features"])


def kernel_candidates(target, override: Sequence[str] | None, op: str) -> list[str]:
    """Kernel names to try for ``op``, best first: ``override`` or the target's strategy,
    then the int8 and reference-int fallbacks (each once)."""
    preferred = list(override) if override is not None else list(_strategy(target).get(op, ()))
    if override is None:
        preferred += [k for k in FALLBACK_KERNELS if k not in preferred]
    return list(dict.fromkeys(preferred))


def _strategy(target) -> dict:
    kernels = getattr(target, "kernels", None) or {}
    return {op: (names,) if isinstance(names, str) else tuple(names) for op, names in kernels.items()}


# --- the pass ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One layer to rewrite, everything resolved at compile time except the activations."""

    info: QuantInfo
    layer_var: Any
    last_var: Any  # the var the epilogue's result replaces (relu/bn/add output or the layer)
    skipped: set  # vars of the chain (layer, bias add, BN, tuple item), not emitted any more
    data: Any  # the layer input expression
    int_layer: Any  # kernels.IntLayer
    kernel: Any  # kernels.IntKernel
    codes: np.ndarray  # [out, ...] after sign folding
    alpha: np.ndarray  # float64 [out]
    bias: np.ndarray | None
    relu: bool
    out_shape: tuple[int, ...]  # the float layer output shape (dense: may be >2-D)
    relu_var: Any = None  # the ReLU output the layer reads, when ``data`` is that ReLU's input


class LowerQuantizedLayers:
    """Graph -> Graph (+ the kernel chosen per layer): quantized layers become integer
    kernels for ``target``.

    ``kernels`` overrides the target's strategy: a sequence of kernel names tried in order
    (no fallback added), or "reference" to keep every layer on the float decode path.
    Apply it to the squeezed graph before ``lower_to_tir``; ``choices`` (layer var name ->
    :class:`KernelChoice`) is filled by each call.
    """

    def __init__(self, target, kernels: Sequence[str] | str | None = None, measured_cost=None, fuse_io: bool = True):
        from lastbit.targets import get_target

        self.target = get_target(target)
        # a kernel with a fused_prim_func does the layer's quantize and epilogue itself
        self.fuse_io = fuse_io
        # (kernel name, IntLayer) -> measured cost or None; see codegen/kernel_cost.py
        self.measured_cost = measured_cost
        self.override = (kernels,) if isinstance(kernels, str) else (tuple(kernels) if kernels is not None else None)
        self.choices: dict[str, KernelChoice] = {}

    def __call__(self, graph: Graph) -> Graph:
        self.choices = {}
        if not graph.quant:
            return graph
        from tvm import relax

        from lastbit.passes.quantize_pow2 import find_quantized_layers

        main = graph.mod["main"]
        param_names = graph.param_vars()
        by_codes = {info.codes_param: info for info in graph.quant.values()}
        var2val = relax.analysis.get_var2val(main)
        consumers = _consumers(main)
        plans = []
        for var, kind, parts in find_quantized_layers(main):
            info = by_codes.get(param_names.get(parts["codes"], ""))
            if info is None:
                log.info("quantized layer %s: codes are not a graph parameter; left as is", var.name)
                continue
            plan = self._plan(graph, var, kind, info, var2val, consumers, param_names)
            if plan is not None:
                plans.append(plan)
        if not plans:
            return graph
        mod = _rewriter_class()(graph.mod, plans, self.target, self.fuse_io).rewrite()
        return graph.replace(mod=mod)

    # -- planning -------------------------------------------------------------------------
    def _plan(self, graph, var, kind, info, var2val, consumers, param_names) -> _Plan | None:
        def fallback(reason: str, passed_over: tuple[str, ...] = ()) -> None:
            log.info("layer %s (%s): float reference path: %s", var.name, info.source_name, reason)
            self.choices[var.name] = KernelChoice(var.name, info.weight, FLOAT_REFERENCE,
                                                  passed_over=passed_over, reason=reason)

        if self.override == (FLOAT_REFERENCE,):
            return fallback("integer kernels switched off")
        codes = np.asarray(graph.params[info.codes_param], dtype=np.int8)
        alpha = np.asarray(graph.params[info.alpha_param], dtype=np.float32)
        call = var2val[var]
        data = call.args[0]  # the var itself: the pattern's match would be the expression bound to it
        if info.act_bits < 8:  # the graph fake-quantizes to the k-bit grid: quantize its input instead
            from lastbit.passes.quantize_pow2 import kbit_fake_quant_source

            source = kbit_fake_quant_source(data, var2val)
            if source is None:
                return fallback(f"the {info.act_bits}-bit activation fake-quant before the layer was not found")
            data = source
        relu_var = None
        if info.activation_scale is not None and _op_name(var2val.get(data, data)) == "relax.nn.relu":
            # quantize(relu(x)) in one pass over x; the ReLU binding dies unless others read it
            relu_var, data = data, var2val[data].args[0]
        data_shape = _static_shape(data)
        if data_shape is None or str(getattr(data.ty, "dtype", "")) != "float32":
            return fallback("the layer input has no static float32 shape")
        if kind == "dense":
            oriented = _dense_codes(call, codes, var2val)
            if oriented is None:
                return fallback("matmul weight is not a 2-D [K, N] operand (or its transpose)")
            codes, out_axis = oriented
            layer_args = {"op": "dense", "data_shape": (int(np.prod(data_shape[:-1])), data_shape[-1])}
            channel_axis = -1
        elif kind == "conv2d":
            attrs = call.attrs
            layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
            if layouts != ("NCHW", "OIHW", "NCHW"):
                return fallback(f"conv2d layouts {layouts} (NCHW/OIHW only)")
            if str(attrs.out_dtype) not in ("", "float32"):
                return fallback(f"conv2d out_dtype {attrs.out_dtype}")
            out_axis = 0
            layer_args = {
                "op": "conv2d", "data_shape": data_shape,
                "strides": tuple(int(s) for s in attrs.strides), "padding": tuple(int(p) for p in attrs.padding),
                "dilation": tuple(int(d) for d in attrs.dilation), "groups": int(attrs.groups),
            }
            channel_axis = 1
        else:
            return fallback(f"{kind} has no integer kernel")
        channels = codes.shape[0]
        alpha_vec = _per_channel_alpha(alpha, out_axis, channels, graph.params[info.codes_param].shape)
        out_shape = _static_shape(var)
        epilogue, last, skipped = self._epilogue_chain(graph, var, kind, alpha_vec, out_shape, channel_axis,
                                                       var2val, consumers, param_names)
        try:
            codes, alpha_pos = fold_epilogue(codes, epilogue)
        except ValueError as err:
            return fallback(f"cannot fold {'+'.join(epilogue.ops)} into the integer epilogue: {err}")

        from lastbit.codegen.kernels import IntLayer

        padding = layer_args.pop("padding", (0, 0, 0, 0))
        if len(padding) == 2:
            padding = (padding[0], padding[1], padding[0], padding[1])
        int_layer = IntLayer(code_set=info.code_set, bits=info.bits, weight_shape=tuple(codes.shape),
                             padding=tuple(padding), act_bits=qr.activation_code_bits(info.act_bits, info.act_unsigned),
                             act_unsigned=info.act_unsigned, **layer_args)
        kernel, passed_over = self._choose_kernel(int_layer, var.name)
        if kernel is None:
            return fallback("no integer kernel serves it", tuple(passed_over))
        self.choices[var.name] = KernelChoice(var.name, info.weight, kernel.name, tuple(epilogue.ops), tuple(passed_over))
        log.info("layer %s (%s): kernel %s%s", var.name, info.source_name, kernel.name,
                 f", epilogue {'+'.join(epilogue.ops)}" if epilogue.ops else "")
        return _Plan(info, var, last, skipped, data, int_layer, kernel, codes, alpha_pos, epilogue.bias,
                     epilogue.relu, out_shape, relu_var)

    @staticmethod
    def _epilogue_chain(graph, var, kind, alpha_vec, out_shape, channel_axis, var2val, consumers, param_names):
        """Follow the layer's single-use chain through a per-channel bias add, inference
        batch-norm (conv2d) and one ReLU: (the folded terms, the chain's last var, its vars)."""
        epilogue = LayerEpilogue(alpha=alpha_vec)
        last, skipped = var, {var}
        while not epilogue.relu:
            nxt = _single_consumer(last, consumers, var2val)
            if nxt is None:
                break
            nvar, nval = nxt
            op = _op_name(nval)
            if op == "relax.add":
                other = nval.args[1] if nval.args[0].same_as(last) else nval.args[0]
                b = _channel_vector(_static_value(other, var2val, graph, param_names), out_shape, channel_axis)
                if b is None or _static_shape(nvar) != out_shape:
                    break
                epilogue.add_bias(b)
            elif op == "relax.nn.batch_norm" and kind == "conv2d":
                bn = _batch_norm_terms(nval, var2val, graph, param_names)
                item = _single_consumer(nvar, consumers, var2val)
                if bn is None or item is None or not _is_item0(item[1]):
                    break
                epilogue.batch_norm(*bn)
                skipped.add(nvar)
                nvar = item[0]
            elif op == "relax.nn.relu":
                epilogue.relu = True
                epilogue.ops.append("relu")
            else:
                break
            skipped.add(nvar)
            last = nvar
        return epilogue, last, skipped

    def _choose_kernel(self, int_layer, layer_name: str):
        """The cheapest registered candidate whose ``supports`` accepts the layer, and why every
        other candidate was passed over (``choose_kernel``)."""
        from lastbit.codegen.kernels import get_kernel

        winner, passed_over = choose_kernel(int_layer, self.target, self.override, self.measured_cost, layer_name)
        return (get_kernel(winner.kernel) if winner is not None else None), passed_over


def choose_kernel(int_layer, target, override: Sequence[str] | None = None, measured_cost=None,
                  layer_name: str = "") -> tuple[Any, list[str]]:
    """The cost (``codegen/kernel_cost.py``) of the cheapest registered candidate of ``target``'s
    strategy (or ``override``) whose ``supports`` accepts ``int_layer``, or None when none does;
    and why every other candidate was passed over. The lowering's choice, also the co-design
    cost model's prior (lastbit/codesign_cost.py)."""
    from lastbit.codegen.kernel_cost import passed_over_reason, rank_candidates
    from lastbit.codegen.kernels import KernelError, get_kernel

    features = target.feature_set()
    listed = set(override if override is not None else _strategy(target).get(int_layer.op, ()))
    passed_over: list[str] = []
    accepted: list[str] = []
    fallbacks: list[str] = []
    for name in kernel_candidates(target, override, int_layer.op):
        try:
            candidate = get_kernel(name)
        except KernelError:  # a strategy may name kernels this build does not have
            log.debug("layer %s: kernel %s is not registered", layer_name, name)
            continue
        why = candidate.supports(int_layer, features)
        if why is not None:
            passed_over.append(f"{name}: {why}")
        else:
            (accepted if name in listed else fallbacks).append(name)
    # the fallbacks only compete when nothing the target (or caller) listed serves the layer
    if accepted:
        passed_over += [f"{name}: fallback only" for name in fallbacks]
    accepted = accepted or fallbacks
    if not accepted:
        return None, passed_over
    ranked = rank_candidates(accepted, int_layer, target.triple, measured=measured_cost)
    winner = ranked[0]
    return winner, [passed_over_reason(loser, winner) for loser in ranked[1:]] + passed_over


# --- helpers on the Relax function -------------------------------------------------------------


def _op_name(expr) -> str:
    op = getattr(expr, "op", None)
    return str(op.name) if op is not None and hasattr(op, "name") else ""


def _static_shape(expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _consumers(func) -> dict:
    """var -> the binding vars whose value uses it (the function result counts as a use)."""
    from tvm import relax

    uses: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for v in relax.analysis.free_vars(binding.value):
                uses.setdefault(v, []).append(binding.var)
    for v in relax.analysis.free_vars(func.body.body):
        uses.setdefault(v, []).append(None)
    return uses


def _single_consumer(var, consumers, var2val):
    users = consumers.get(var, [])
    if len(users) != 1 or users[0] is None:
        return None
    return users[0], var2val.get(users[0])


def _is_item0(expr) -> bool:
    from tvm import relax

    return isinstance(expr, relax.TupleGetItem) and int(expr.index) == 0


def _static_value(expr, var2val, graph: Graph, param_names: dict) -> np.ndarray | None:
    """The compile-time value of a constant, a parameter, or a reshape/astype of one."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.GenericConst):
        return np.asarray(expr.value.numpy())
    if isinstance(expr, relax.Var):
        if expr in param_names:
            return np.asarray(graph.params[param_names[expr]])
        if expr in var2val:
            return _static_value(var2val[expr], var2val, graph, param_names)
        return None
    if _op_name(expr) == "relax.reshape":
        inner = _static_value(expr.args[0], var2val, graph, param_names)
        shape = _static_shape(expr)
        return None if inner is None or shape is None else inner.reshape(shape)
    return None


def _channel_vector(value: np.ndarray | None, out_shape, channel_axis: int) -> np.ndarray | None:
    """``value`` as one number per output channel, when adding it to the layer output only
    varies along the channel axis (a bias); else None."""
    if value is None or out_shape is None or value.ndim > len(out_shape) or value.dtype != np.float32:
        return None
    channels = out_shape[channel_axis]
    full = (1,) * (len(out_shape) - value.ndim) + tuple(value.shape)
    axis = channel_axis % len(out_shape)
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def _batch_norm_terms(call, var2val, graph, param_names):
    attrs = call.attrs
    if int(attrs.axis) != 1 or bool(getattr(attrs, "training", False)):
        return None
    values = [_static_value(a, var2val, graph, param_names) for a in call.args[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = values
    if not bool(attrs.scale):
        gamma = np.ones_like(mean)
    if not bool(attrs.center):
        beta = np.zeros_like(mean)
    return gamma, beta, mean, var, float(attrs.epsilon)


def _dense_codes(call, codes: np.ndarray, var2val) -> tuple[np.ndarray, int] | None:
    """Codes as [N, K] for ``matmul(x, W)`` and the axis of the codes parameter that holds N."""
    if codes.ndim != 2 or len(call.args[1].ty.shape) != 2:
        return None
    operand = call.args[1]
    value = var2val.get(operand, operand)
    if _op_name(value) == "relax.permute_dims":
        axes = value.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        return codes, 0  # W = codesᵀ: codes are [N, K] already
    return np.ascontiguousarray(codes.T), 1


def _per_channel_alpha(alpha: np.ndarray, out_axis: int, channels: int, codes_shape) -> np.ndarray:
    """α as float64 [channels] along the layer's output axis of the codes parameter."""
    if alpha.size == 1:
        return np.full(channels, float(alpha.reshape(())), dtype=np.float64)
    full = np.broadcast_to(alpha, codes_shape)
    full = np.moveaxis(full, out_axis, 0).reshape(channels, -1)
    return full[:, 0].astype(np.float64)


# --- the IR rewrite ------------------------------------------------------------------------------


def _rewriter_class():
    """The mutator class (built lazily: tvm is imported on first use, 3 s)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from lastbit.codegen.cpu_schedule import cpu_info, schedule_prim_func

    op = relax.op

    @mutator
    class QuantizedLayerRewriter(PyExprMutator):
        """Emits the integer path at each planned layer's binding and drops the bindings of
        the chain it replaces; every binding is visited once, so nothing can loop."""

        def __init__(self, mod, plans: list[_Plan], target, fuse_io: bool):
            super().__init__(mod)
            self.fuse_io = fuse_io
            self.mod = mod
            self.plans = {plan.layer_var: plan for plan in plans}
            self.skipped = set().union(*(plan.skipped for plan in plans))
            self.target = target
            self.info = cpu_info(target)
            self.features = target.feature_set()
            self.funcs: dict = {}  # cache key -> GlobalVar (identical layers share a PrimFunc)

        def rewrite(self):
            main_gv = self.mod.get_global_var("main")
            func = self.visit_expr(self.mod["main"])
            self.builder_.update_func(main_gv, func)
            return self.builder_.get()

        def visit_var_binding_(self, binding):
            plan = self.plans.get(binding.var)
            if plan is not None:
                result = self._emit_integer_layer(plan)
                if isinstance(plan.last_var, relax.DataflowVar):
                    new = self.builder_.emit(result, plan.last_var.name)
                else:
                    new = self.builder_.emit_output(result, plan.last_var.name)
                self.set_var_remap(plan.last_var, new)
                return
            if binding.var in self.skipped:
                return
            super().visit_var_binding_(binding)

        # -- emission -----------------------------------------------------------------------
        def _emit_integer_layer(self, plan: _Plan):
            bb = self.builder_
            layer = plan.int_layer
            # a ReLU ending another layer's replaced chain is in that layer's epilogue already
            fold_relu = plan.relu_var is not None and not ({plan.relu_var, plan.data} & self.skipped)
            x = self.visit_expr(plan.data if plan.relu_var is None or fold_relu else plan.relu_var)
            if layer.op == "dense" and tuple(_static_shape(plan.data)) != layer.data_shape:
                x = bb.emit(op.reshape(x, layer.data_shape))
            s = plan.info.activation_scale
            lo, hi = qr.activation_range(plan.info.act_bits, plan.info.act_unsigned)
            channels = layer.weight_shape[0]
            if s is not None:
                inv = np.float32(1.0 / float(np.float32(s)))
                scale_np = qr.output_scale(plan.alpha, np.float32(s))
                scale = relax.const(scale_np, "float32")
                bias_q = relax.const(qr.integer_bias(plan.bias, scale_np, channels), "int32")
            else:  # dynamic: quant_reference.activation_scale computed in the graph, same IEEE ops
                peak = bb.emit(relax.call_tir(self._abs_max_func(layer.data_shape), relax.Tuple([x]),
                                              out_ty=relax.TensorType((), "float32")))
                s_x = bb.emit(op.maximum(op.divide(peak, relax.const(np.float32(hi), "float32")),
                                         relax.const(np.finfo(np.float32).tiny, "float32")))
                s_64 = bb.emit(op.astype(s_x, "float64"))
                inv = bb.emit(op.astype(op.divide(relax.const(1.0, "float64"), s_64), "float32"))
                scale = bb.emit(op.astype(op.multiply(relax.const(plan.alpha, "float64"), s_64), "float32"))
                if plan.bias is None:
                    bias_q = relax.const(np.zeros(channels, np.int32), "int32")
                else:
                    ratio = op.divide(relax.const(plan.bias, "float64"), op.astype(scale, "float64"))
                    i32 = np.iinfo(np.int32)
                    bias_q = bb.emit(op.astype(op.clip(op.round(ratio), float(i32.min), float(i32.max)), "int32"))
            packed = [relax.const(np.ascontiguousarray(a)) for a in plan.kernel.pack(layer, plan.codes)]
            kernel = plan.kernel
            if (self.fuse_io and kernel.fused_prim_func is not None and layer.op == "conv2d"
                    and (kernel.fuses is None or kernel.fuses(layer))):
                from lastbit.codegen.kernels import FusedIO

                io = FusedIO(lo, hi, input_relu=fold_relu, output_relu=plan.relu)
                inv_arg = relax.const(inv, "float32") if s is not None else inv  # a () tensor either way
                return relax.call_tir(self._kernel_func(plan, io), relax.Tuple([x, inv_arg, *packed, bias_q, scale]),
                                      out_ty=relax.TensorType(plan.out_shape, "float32"))
            quantize_gv = self._quantize_func(layer.data_shape, lo, hi, float(inv) if s is not None else None,
                                              fold_relu)
            x_q = bb.emit(relax.call_tir(quantize_gv, relax.Tuple([x] if s is not None else [x, inv]),
                                         out_ty=relax.TensorType(layer.data_shape, "int8")), plan.layer_var.name + "_q")
            acc_shape = self._acc_shape(plan)
            kernel_gv = self._kernel_func(plan)
            acc = bb.emit(relax.call_tir(kernel_gv, relax.Tuple([x_q, *packed]),
                                         out_ty=relax.TensorType(acc_shape, "int32")), plan.layer_var.name + "_acc")
            epi_gv = self._epilogue_func(acc_shape, 1, plan.relu)  # channels: NCHW axis 1, dense [M, N] axis 1
            out = relax.call_tir(epi_gv, relax.Tuple([acc, bias_q, scale]), out_ty=relax.TensorType(acc_shape, "float32"))
            if tuple(acc_shape) != tuple(plan.out_shape):
                out = op.reshape(bb.emit(out), plan.out_shape)
            return out

        def _acc_shape(self, plan: _Plan) -> tuple[int, ...]:
            layer = plan.int_layer
            if layer.op == "dense":
                return (layer.data_shape[0], layer.weight_shape[0])
            return tuple(plan.out_shape)

        def _kernel_func(self, plan: _Plan, io=None):
            """The kernel's PrimFunc for the layer (``io``: its fused form), default-scheduled."""
            layer, kernel = plan.int_layer, plan.kernel
            key = ("kernel", kernel.name, layer, io)
            if key not in self.funcs:
                func = kernel.prim_func(layer) if io is None else kernel.fused_prim_func(layer, io)
                try:
                    from tvm import s_tir

                    sch = s_tir.Schedule(func)
                    kernel.schedule(sch, layer, self.features)
                    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                except Exception as err:  # noqa: BLE001 - a kernel's schedule refused this shape: generic one
                    log.warning("kernel %s: schedule failed for %s (%s); using the generic schedule",
                                kernel.name, layer, str(err).strip().splitlines()[0] if str(err).strip() else err)
                    func = schedule_prim_func(func, self.info, name=kernel.name)
                func = func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
                func = func.with_attr(KERNEL_ATTR, kernel.name)
                func = func.with_attr(INT_LAYER_ATTR, int_layer_to_json(layer, self.features))
                if io is not None:
                    func = func.with_attr(FUSED_IO_ATTR, fused_io_to_json(io))
                fused = "" if io is None else "_fused"
                name = f"{kernel.name.replace('-', '_')}{fused}_{layer.op}"
                self.funcs[key] = self.builder_.add_func(func, name)
            return self.funcs[key]

        def _quantize_func(self, shape, lo: int, hi: int, inv: float | None, relu: bool):
            key = ("quantize", tuple(shape), lo, hi, inv, relu)
            if key not in self.funcs:
                func = quantize_prim_func(tuple(shape), lo, hi, inv, self.info.lanes, rounds_in_vector(self.target),
                                          relu=relu)
                self.funcs[key] = self.builder_.add_func(func.with_attr("op_pattern", OPAQUE),
                                                         "int_relu_quantize" if relu else "int_quantize")
            return self.funcs[key]

        def _abs_max_func(self, shape):
            key = ("abs_max", tuple(shape))
            if key not in self.funcs:
                func = abs_max_prim_func(tuple(shape), self.info.lanes).with_attr("op_pattern", OPAQUE)
                self.funcs[key] = self.builder_.add_func(func, "int_abs_max")
            return self.funcs[key]

        def _epilogue_func(self, acc_shape, channel_axis: int, relu: bool):
            key = ("epilogue", tuple(acc_shape), channel_axis, relu)
            if key not in self.funcs:
                func = epilogue_prim_func(tuple(acc_shape), channel_axis, relu, self.info.lanes)
                func = func.with_attr("op_pattern", OPAQUE)
                self.funcs[key] = self.builder_.add_func(func, "int_epilogue_relu" if relu else "int_epilogue")
            return self.funcs[key]

    return QuantizedLayerRewriter

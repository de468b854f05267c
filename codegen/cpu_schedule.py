"""Default (untuned) fp32 CPU code for lowered lastbit modules.

Two steps, both needed for speed:

* :func:`prepare_for_cpu` rewrites the bound Relax module *before* legalization: bias and
  inference BatchNorm fold into the convolution weights; convolutions with constant weights
  move to the blocked ``NCHW[x]c`` activation layout with weights pre-packed as
  ``OIHW[x]i[y]o`` (the layout of TVM's old x86 ``conv2d_NCHWc``), the layout is carried
  through element-wise ops and pooling so transforms only appear at the edges; dense layers
  get their constant weight pre-packed as ``[N/nb, K, nb]`` panels; exp/erf/tanh-based ops
  get polynomial versions that vectorize.
* :func:`schedule_for_cpu` schedules every PrimFunc of the lowered module: register-tiled
  kernels for those packed convolutions and dense layers (epilogues fused into the register
  tile), and a safe generic schedule (parallel + vectorize) for everything else.  A
  schedule that fails falls back to the generic one, and then to the unscheduled function,
  logging which.

Every tiling choice is a field of a small knob dataclass (:class:`ConvKnobs`,
:class:`DenseKnobs`, :class:`GenericKnobs`) whose defaults come from the target's vector
width and register count, so an autotuner can later sample them instead.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from lastbit.codegen.quant_prims import MIN_PARALLEL_ELEMS

log = logging.getLogger(__name__)

# Block annotation that tags the main compute of our kernels; FuseTIR keeps it.
SCHEDULE_RULE = "schedule_rule"
CONV2D_NCHWC = "lastbit.conv2d_nchwc"
DEPTHWISE_NCHWC = "lastbit.depthwise_conv2d_nchwc"
DENSE_PACKED = "lastbit.dense_packed"


# --------------------------------------------------------------------------------------------
# Target facts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """What the schedules need to know about a CPU target."""

    vector_bits: int  # SIMD register width
    num_vector_regs: int  # architectural SIMD registers
    num_cores: int

    @property
    def lanes(self) -> int:
        """fp32 lanes in one SIMD register."""
        return max(1, self.vector_bits // 32)


def _as_tvm_target(target):
    """A ``tvm.target.Target`` from one, a lastbit ``Target`` or a triple string."""
    if isinstance(target, str):
        from lastbit.targets import get_target

        target = get_target(target)
    return target.tvm() if hasattr(target, "tvm") and callable(target.tvm) else target


def cpu_info(target) -> CpuInfo:
    """Vector width and register count of an llvm target (AVX-512 / AVX2 / NEON / scalar)."""
    target = _as_tvm_target(target)
    mtriple = str(target.attrs.get("mtriple", "") or "")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    mattr = [str(a) for a in (target.attrs.get("mattr", None) or [])]
    num_cores = int(target.attrs.get("num-cores", 0) or 0) or 1
    if mtriple.startswith(("aarch64", "arm64")):
        return CpuInfo(128, 32, num_cores)
    if mtriple.startswith(("arm", "thumb")):
        has_neon = any("neon" in a for a in mattr)
        return CpuInfo(128 if has_neon else 32, 16 if has_neon else 1, num_cores)
    features = set(a.lstrip("+") for a in mattr if a.startswith("+"))
    if mcpu:
        try:
            from tvm.target import codegen

            features |= {str(f) for f in codegen.llvm_get_cpu_features(target)}
        except Exception:  # pragma: no cover - feature query is best effort
            pass
    if "avx512f" in features:
        return CpuInfo(512, 32, num_cores)
    if "avx2" in features or "avx" in features:
        return CpuInfo(256, 16, num_cores)
    return CpuInfo(128, 16, num_cores)  # SSE2 is baseline x86-64


def channel_block(channels: int, lanes: int) -> int:
    """Largest block of at most ``lanes`` (a power of two) that divides ``channels``."""
    block = lanes
    while block > 1 and channels % block:
        block //= 2
    return block


# --------------------------------------------------------------------------------------------
# Knobs (the search space an autotuner will sample; defaults are good untuned choices)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutKnobs:
    """Data-layout choices made in :func:`prepare_for_cpu` (they change the graph, so a tuner
    compares whole candidates): the largest channel block, in SIMD vectors, and the width of
    a dense weight panel, in SIMD vectors."""

    channel_block_vectors: int = 1
    dense_panel_vectors: int = 2


@dataclass(frozen=True)
class ConvKnobs:
    """Register tile of an ``NCHW[x]c`` convolution: ``ow_tile`` output columns times the
    output-channel block (one or more SIMD vectors)."""

    ow_tile: int
    unroll_kw: bool = False


@dataclass(frozen=True)
class DenseKnobs:
    """Register tile of a packed dense layer: ``m_tile`` rows times the ``nb``-wide weight
    panel, with the reduction unrolled by ``k_unroll``."""

    m_tile: int
    k_unroll: int = 4


@dataclass(frozen=True)
class GenericKnobs:
    """Injective / reduction fallback: minimum work per parallel task and vector width."""

    vector_lanes: int
    min_parallel_elems: int = MIN_PARALLEL_ELEMS


def conv_register_budget(oc_block: int, info: CpuInfo) -> int:
    """Most output columns whose accumulators fit in registers (a few kept for operands)."""
    vectors_per_column = max(1, oc_block // info.lanes)
    return max(2, (info.num_vector_regs - 4) // vectors_per_column)


def dense_register_budget(nb: int, info: CpuInfo) -> int:
    """Most rows of a dense register tile (capped at 8: more only adds input broadcasts)."""
    return max(1, min(8, (info.num_vector_regs - 4) // max(1, nb // info.lanes)))


def default_conv_knobs(out_width: int, oc_block: int, info: CpuInfo) -> ConvKnobs:
    """Output-column tile: the fewest tiles that fit the register file, evenly sized."""
    return ConvKnobs(ow_tile=balanced_tile(out_width, conv_register_budget(oc_block, info)))


def default_dense_knobs(m: int, nb: int, info: CpuInfo) -> DenseKnobs:
    return DenseKnobs(m_tile=balanced_tile(m, dense_register_budget(nb, info)))


def balanced_tile(extent: int, bound: int) -> int:
    """Tile of at most ``bound`` covering ``extent`` in the fewest, most even pieces: 56 -> 28,
    37 -> 19 (the last tile is one short and runs under a predicate)."""
    pieces = -(-extent // max(1, bound))
    return -(-extent // pieces)


# --------------------------------------------------------------------------------------------
# TE compute definitions of the packed kernels
# --------------------------------------------------------------------------------------------


def _pad_nchwc(data, kh: int, kw: int, strides, padding, dilation):
    """(``data`` zero-padded by (top, left, bottom, right) ``padding``, output height, width)
    of a ``kh×kw`` window over NCHWc ``data``."""
    from tvm import topi

    _, _, h, w, _ = (int(d) for d in data.shape)
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, [0, 0, pt, pl, 0], [0, 0, pb, pr, 0], name="data_pad")
    return data, oh, ow


def conv2d_nchwc_compute(data, kernel, strides, padding, dilation, groups: int = 1):
    """``data [N, C/ib, H, W, ib]`` * ``kernel [O/ob, C/g/ib, KH, KW, ib, ob]`` ->
    ``[N, O/ob, OH, OW, ob]``; ``padding`` is (top, left, bottom, right)."""
    from tvm import te

    n = int(data.shape[0])
    oc_chunks, ic_chunks, kh, kw, ib, ob = (int(d) for d in kernel.shape)
    sh, sw = strides
    dh, dw = dilation
    data, oh, ow = _pad_nchwc(data, kh, kw, strides, padding, dilation)
    ric = te.reduce_axis((0, ic_chunks), name="ic_chunk")
    rkh = te.reduce_axis((0, kh), name="kh")
    rkw = te.reduce_axis((0, kw), name="kw")
    rib = te.reduce_axis((0, ib), name="ic_block")
    oc_per_group = oc_chunks // groups

    def ic_index(oc):
        return ric if groups == 1 else (oc // oc_per_group) * ic_chunks + ric

    return te.compute(
        (n, oc_chunks, oh, ow, ob),
        lambda b, oc, y, x, oi: te.sum(
            data[b, ic_index(oc), y * sh + rkh * dh, x * sw + rkw * dw, rib]
            * kernel[oc, ric, rkh, rkw, rib, oi],
            axis=[ric, rkh, rkw, rib],
        ),
        name="conv2d_nchwc",
        attrs={SCHEDULE_RULE: CONV2D_NCHWC},
    )


def depthwise_conv2d_nchwc_compute(data, kernel, strides, padding, dilation):
    """``data [N, C/b, H, W, b]`` * ``kernel [C/b, KH, KW, b]`` -> ``[N, C/b, OH, OW, b]``."""
    from tvm import te

    n, chunks, _, _, b = (int(d) for d in data.shape)
    _, kh, kw, _ = (int(d) for d in kernel.shape)
    sh, sw = strides
    dh, dw = dilation
    data, oh, ow = _pad_nchwc(data, kh, kw, strides, padding, dilation)
    rkh = te.reduce_axis((0, kh), name="kh")
    rkw = te.reduce_axis((0, kw), name="kw")
    return te.compute(
        (n, chunks, oh, ow, b),
        lambda bn, c, y, x, ci: te.sum(
            data[bn, c, y * sh + rkh * dh, x * sw + rkw * dw, ci] * kernel[c, rkh, rkw, ci],
            axis=[rkh, rkw],
        ),
        name="depthwise_conv2d_nchwc",
        attrs={SCHEDULE_RULE: DEPTHWISE_NCHWC},
    )


def dense_packed_compute(x, packed_weight, out_features: int):
    """``x [..., K]`` @ ``W`` with ``W`` pre-packed as ``[ceil(N/nb), K, nb]`` -> ``[..., N]``."""
    from tvm import te

    k_dim = int(x.shape[-1])
    nb = int(packed_weight.shape[2])
    rk = te.reduce_axis((0, k_dim), name="k")

    def body(*idx):
        j = idx[-1]
        return te.sum(x[(*idx[:-1], rk)] * packed_weight[j // nb, rk, j % nb], axis=rk)

    return te.compute(
        (*x.shape[:-1], out_features), body, name="dense_packed", attrs={SCHEDULE_RULE: DENSE_PACKED}
    )


# --------------------------------------------------------------------------------------------
# Relax-level preparation: blocked layouts and pre-packed weights
# --------------------------------------------------------------------------------------------

_UNARY_ELEMENTWISE = frozenset(
    "relax." + name
    for name in (
        "nn.relu", "nn.relu6", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.leakyrelu", "clip",
        "sigmoid", "tanh", "exp", "negative", "sqrt", "rsqrt", "abs", "square", "floor", "ceil",
        "round", "erf", "log", "hardswish", "nn.hardswish",
    )
)
_BINARY_ELEMENTWISE = frozenset(
    "relax." + name for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power")
)
_NUMPY_FOLD = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
    "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda a: 1.0 / np.sqrt(a),
    "relax.negative": np.negative,
}


def prepare_for_cpu(
    mod: "tvm.IRModule", target=None, layout: LayoutKnobs | None = None, fast_math: bool = True  # noqa: F821
) -> "tvm.IRModule":  # noqa: F821
    """Rewrite a bound Relax module (parameters are constants, not yet legalized) so that
    convolutions and dense layers run as pre-packed kernels in blocked layouts.

    Call it on ``graph.bound_module()`` before ``lower_to_tir``'s pass sequence; the
    result legalizes and fuses with the ordinary passes and is then scheduled by
    :func:`schedule_for_cpu`.  Ops it does not recognise, and ops whose weights are not
    constants (an unbound module), are left untouched.  ``target`` (a ``tvm.target.Target``,
    a lastbit ``Target`` or a triple) sets the channel block to its vector width; None means
    this host.  ``layout`` overrides
    the default :class:`LayoutKnobs`.  ``fast_math`` swaps exp/erf/tanh/sigmoid/GELU/SiLU/
    softmax for polynomial versions (relative error ~3e-7) that vectorize.
    """
    import tvm
    from tvm import relax

    info = cpu_info("x86_64-linux-gnu" if target is None else target)
    layout = layout or LayoutKnobs()
    mod = tvm.ir.transform.Sequential(
        [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()],
        name="lastbit.prepare_for_cpu.canonicalize",
    )(mod)
    mod = _affine_folder_class().run(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = _layout_rewriter_class().run(mod, info, layout)
    if fast_math:
        mod = _fast_math_class().run(mod)
    return tvm.ir.transform.Sequential(
        [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()],
        name="lastbit.prepare_for_cpu.cleanup",
    )(mod)


def _static_shape(expr) -> tuple[int, ...] | None:
    from tvm import relax

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):
        return None


def _dtype(expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def pack_conv_weight(weight: np.ndarray, ib: int, ob: int) -> np.ndarray:
    """``OIHW`` -> ``[O/ob, I/ib, KH, KW, ib, ob]``."""
    o, i, kh, kw = weight.shape
    packed = weight.reshape(o // ob, ob, i // ib, ib, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    return np.ascontiguousarray(packed)


def pack_depthwise_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """``[C, 1, KH, KW]`` -> ``[C/b, KH, KW, b]``."""
    c, _, kh, kw = weight.shape
    return np.ascontiguousarray(weight.reshape(c // block, block, kh, kw).transpose(0, 2, 3, 1))


def pack_dense_weight(weight_kn: np.ndarray, nb: int) -> np.ndarray:
    """``[K, N]`` -> ``[ceil(N/nb), K, nb]`` (zero padded)."""
    k, n = weight_kn.shape
    chunks = -(-n // nb)
    if n % nb == 0:
        return np.ascontiguousarray(weight_kn.reshape(k, chunks, nb).transpose(1, 0, 2))
    padded = np.zeros((k, chunks * nb), dtype=weight_kn.dtype)
    padded[:, :n] = weight_kn
    return np.ascontiguousarray(padded.reshape(k, chunks, nb).transpose(1, 0, 2))


def pack_nchw_array(value: np.ndarray, channels: int, block: int) -> np.ndarray | None:
    """A constant operand broadcasting against ``[N, C, H, W]`` -> its ``[N, C/b, H, W, b]``
    form, or None when its shape does not broadcast per channel."""
    if value.ndim > 4:
        return None
    v = value.reshape((1,) * (4 - value.ndim) + value.shape)
    n, c, h, w = v.shape
    if c == channels:
        return np.ascontiguousarray(v.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))
    if c == 1:
        return v.reshape(n, 1, h, w, 1)
    return None


class _ConstantTracker:
    """numpy values of constant operands: literals and vars bound to constant math (BN
    statistics, transposed weights).  Bindings are still emitted as they are; they die
    when only our rewrites read them and are folded by the later passes otherwise."""

    # astype folds the int8 -> float32 decode of power-of-two codes (QuantizePow2).
    _SHAPE_OPS = ("relax.astype", "relax.expand_dims", "relax.permute_dims", "relax.reshape")

    def __init__(self):
        self.values: dict = {}  # Var -> numpy value
        self.literals: dict = {}  # relax constant -> numpy value (.numpy() copies)

    def value(self, expr, lookup_binding):
        from tvm import relax

        if isinstance(expr, _tvm_ir().GenericConst):
            return self._literal(expr)
        if isinstance(expr, relax.Var):
            if expr in self.values:
                return self.values[expr]
            bound = lookup_binding(expr)
            if isinstance(bound, _tvm_ir().GenericConst):
                return self._literal(bound)
        return None

    def _literal(self, const):
        value = self.literals.get(const)
        if value is None:
            value = self.literals[const] = const.value.numpy()
        return value

    def record(self, var, call, lookup_binding) -> None:
        name = call.op.name
        if name not in _NUMPY_FOLD and name not in self._SHAPE_OPS:
            return
        operands = call.args[:1] if name == "relax.reshape" else call.args
        args = [self.value(a, lookup_binding) for a in operands]
        if not args or any(a is None for a in args):
            return
        if name in _NUMPY_FOLD:
            value = _NUMPY_FOLD[name](*args)
        elif name == "relax.astype":
            value = args[0].astype(_dtype(call))
        elif name == "relax.expand_dims":
            value = args[0]
            for ax in sorted(int(a) % (value.ndim + len(call.attrs.axis)) for a in call.attrs.axis):
                value = np.expand_dims(value, ax)
        elif name == "relax.permute_dims":
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            value = np.transpose(args[0], axes)  # a view: packing copies once
        else:
            shape = _static_shape(call)
            if shape is None:
                return
            value = args[0].reshape(shape)
        value = np.asarray(value)
        if value.dtype == np.dtype(_dtype(call)) and _static_shape(call) == tuple(value.shape):
            self.values[var] = value


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector when it broadcasts per channel of NCHW."""
    if value.ndim > 4:
        return None
    v = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if v.shape[0] != 1 or v.shape[2:] != (1, 1) or v.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1), (channels,)).astype(np.float64)


def _use_counts(func) -> dict:
    """How many times each Var is read in ``func`` (bindings and the body's result)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    counts: dict = {}

    @visitor
    class Counter(PyExprVisitor):
        def visit_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

    Counter().visit_expr(func.body if isinstance(func, relax.Function) else func)
    return counts


@functools.lru_cache(maxsize=None)
def _affine_folder_class():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class AffineFolder(PyExprMutator):
        """Folds per-channel constant arithmetic after a convolution (bias add, inference
        BatchNorm's subtract/divide/multiply/add) into the convolution's weights and one
        bias add, when each intermediate value has no other reader.

        ``y = conv(x, W) * s + t`` is re-emitted at every step as ``conv(x, W*s) + t``;
        the superseded bindings are dead and removed by DCE afterwards.
        """

        def __init__(self, mod, counts):
            super().__init__(mod)
            self.counts = counts
            self.constants = _ConstantTracker()
            self.affine: dict = {}  # Var -> (conv call, scale[O], shift[O])

        @classmethod
        def run(cls, mod):
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    folder = cls(mod, _use_counts(func))
                    folder.builder_.update_func(gv, folder.visit_expr(func))
                    mod = folder.builder_.get()
            return mod

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, _tvm_ir().Op):
                self.constants.record(binding.var, value, self.lookup_binding)
                try:
                    if self._fold(binding.var, value):
                        return
                except Exception as err:  # keep the original op
                    log.info("prepare_for_cpu: did not fold %s into its conv (%s)", value.op.name, err)
            super().visit_var_binding_(binding)

        def _conv_of(self, var):
            """(conv call, scale, shift) when ``var`` is an affine conv result read once."""
            if not isinstance(var, relax.Var) or self.counts.get(var, 0) != 1:
                return None
            if var in self.affine:
                return self.affine[var]
            bound = self.lookup_binding(var)
            if (
                isinstance(bound, relax.Call)
                and isinstance(bound.op, _tvm_ir().Op)
                and bound.op.name == "relax.nn.conv2d"
                and bound.attrs.data_layout == "NCHW"
                and bound.attrs.kernel_layout == "OIHW"
                and bound.attrs.out_layout == "NCHW"
                and _dtype(bound) == "float32"
            ):
                weight = self.constants.value(bound.args[1], self.lookup_binding)
                if weight is not None and weight.ndim == 4:
                    channels = weight.shape[0]
                    return bound, np.ones(channels), np.zeros(channels)
            return None

        def _fold(self, var, call) -> bool:
            name = call.op.name
            if name not in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide"):
                return False
            lhs, rhs = call.args
            conv, const, conv_on_lhs = self._conv_of(lhs), rhs, True
            if conv is None and name in ("relax.add", "relax.multiply"):
                conv, const, conv_on_lhs = self._conv_of(rhs), lhs, False
            if conv is None:
                return False
            conv_call, scale, shift = conv
            value = self.constants.value(const, self.lookup_binding)
            if value is None:
                return False
            c = _per_channel(value, scale.shape[0])
            if c is None or (name == "relax.subtract" and not conv_on_lhs):
                return False
            if name == "relax.add":
                shift = shift + c
            elif name == "relax.subtract":
                shift = shift - c
            elif name == "relax.multiply":
                scale, shift = scale * c, shift * c
            else:
                if not np.all(c != 0):
                    return False
                scale, shift = scale / c, shift / c
            weight = self.constants.value(conv_call.args[1], self.lookup_binding)
            scaled = (weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
            data = self.visit_expr(conv_call.args[0])
            new_conv = relax.Call(conv_call.op, [data, _relax_const(scaled)], conv_call.attrs, conv_call.ty_args)
            conv_var = self.builder_.emit(new_conv)
            bias = _relax_const(shift.astype(np.float32).reshape(1, -1, 1, 1))
            expr = relax.op.add(conv_var, bias)
            new = self.builder_.emit(expr, var.name) if isinstance(var, relax.DataflowVar) else \
                self.builder_.emit_output(expr, var.name)
            self.set_var_remap(var, new)
            self.affine[var] = (conv_call, scale, shift)
            return True

    return AffineFolder


@functools.lru_cache(maxsize=None)
def _layout_rewriter_class():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rewriter(PyExprMutator):
        """Walks ``main``'s bindings in order, emitting blocked-layout versions of the ops
        it knows and keeping, for every rewritten value, both its blocked form (for the
        consumers that accept it) and an NCHW form (for the rest; dead ones are removed)."""

        def __init__(self, mod, info: CpuInfo, layout: LayoutKnobs, counts: dict):
            super().__init__(mod)
            self.info = info
            self.layout = layout
            self.block_limit = info.lanes * layout.channel_block_vectors
            self.counts = counts
            self.blocked: dict = {}  # original Var -> (blocked Var, block)
            self.constants = _ConstantTracker()
            self.handlers = {
                "relax.nn.conv2d": self._conv2d,
                "relax.matmul": self._matmul,
                "relax.nn.max_pool2d": self._pool2d,
                "relax.nn.avg_pool2d": self._pool2d,
                "relax.nn.adaptive_avg_pool2d": self._adaptive_pool2d,
                "relax.mean": self._spatial_reduce,
                "relax.sum": self._spatial_reduce,
                "relax.max": self._spatial_reduce,
            }

        @classmethod
        def run(cls, mod, info: CpuInfo, layout: LayoutKnobs):
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    rewriter = cls(mod, info, layout, _use_counts(func))
                    rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
                    mod = rewriter.builder_.get()
            return mod

        # ---- binding dispatch ----------------------------------------------------------
        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, _tvm_ir().Op):
                name = value.op.name
                try:
                    self._fold_constant(binding.var, value)
                    handler = self.handlers.get(name)
                    if handler is None:
                        if name in _UNARY_ELEMENTWISE:
                            handler = self._unary
                        elif name in _BINARY_ELEMENTWISE:
                            handler = self._binary
                    if handler is not None and handler(binding.var, value):
                        return
                except Exception as err:  # keep the original op: never fail the build here
                    log.info("prepare_for_cpu: left %s as is (%s)", name, err)
            super().visit_var_binding_(binding)

        def _emit(self, var, expr):
            """Bind ``var``'s new value."""
            if isinstance(var, relax.DataflowVar):
                new = self.builder_.emit(expr, var.name)
            else:
                new = self.builder_.emit_output(expr, var.name)
            self.set_var_remap(var, new)
            return new

        def _emit_blocked(self, var, blocked_expr, block: int):
            """Bind the blocked result and an NCHW view of it for other consumers."""
            blocked = self.builder_.emit(blocked_expr, var.name + "_nchwc")
            self.blocked[var] = (blocked, block)
            # Keyed by the new NCHW var too: re-emitted bindings (e.g. a pad) refer to it.
            self.blocked[self._emit(var, _unblock(blocked, block))] = (blocked, block)
            return blocked

        # ---- constants -----------------------------------------------------------------
        def _const_value(self, expr):
            return self.constants.value(expr, self.lookup_binding)

        def _fold_constant(self, var, call) -> None:
            self.constants.record(var, call, self.lookup_binding)

        # ---- layout helpers ------------------------------------------------------------
        def _blocked_input(self, expr, block: int):
            """``expr`` (NCHW) in ``NCHW{block}c`` layout, reusing a blocked twin if any."""
            if isinstance(expr, relax.Var) and expr in self.blocked:
                blocked, have = self.blocked[expr]
                if have == block:
                    return blocked
            return self.builder_.emit(_block(self.visit_expr(expr), block))

        def _blocked_of(self, expr):
            if isinstance(expr, relax.Var) and expr in self.blocked:
                return self.blocked[expr]
            return None

        # ---- convolution ---------------------------------------------------------------
        def _conv2d(self, var, call) -> bool:
            attrs = call.attrs
            data, weight = call.args
            w = self._const_value(weight)
            dshape = _static_shape(data)
            if (
                w is None
                or dshape is None
                or len(dshape) != 4
                or attrs.data_layout != "NCHW"
                or attrs.kernel_layout != "OIHW"
                or attrs.out_layout != "NCHW"
                or _dtype(data) != "float32"
                or _dtype(call) != "float32"
            ):
                return False
            groups = int(attrs.groups)
            o, i_per_group, kh, kw = w.shape
            c = dshape[1]
            strides = tuple(int(s) for s in attrs.strides)
            dilation = tuple(int(d) for d in attrs.dilation)
            padding = tuple(int(p) for p in attrs.padding)
            data, padding = self._absorb_zero_pad(data, padding)
            lanes = self.block_limit
            if groups > 1 and groups == c == o and i_per_group == 1:
                block = channel_block(c, lanes)
                existing = self._blocked_of(data)
                if existing is not None and c % existing[1] == 0 and existing[1] > 1:
                    block = existing[1]
                data_c = self._blocked_input(data, block)
                packed = _relax_const(pack_depthwise_weight(w, block))
                out = self.builder_.call_te(
                    depthwise_conv2d_nchwc_compute, data_c, packed, strides=strides, padding=padding,
                    dilation=dilation, primfunc_name_hint="depthwise_conv2d_nchwc",
                )
                self._emit_blocked(var, out, block)
                return True
            ob = channel_block(o // groups, lanes)
            existing = self._blocked_of(data)
            if existing is not None and i_per_group % existing[1] == 0:
                ib = existing[1]
            elif c < lanes and groups == 1:
                ib = 1  # e.g. RGB input: NCHW1c is NCHW, no transform needed
            else:
                ib = channel_block(i_per_group, lanes)
            if groups > 1 and (ob == 1 or (o // groups) % ob or i_per_group % ib):
                return False
            data_c = self._blocked_input(data, ib)
            packed = _relax_const(pack_conv_weight(w, ib, ob))
            out = self.builder_.call_te(
                conv2d_nchwc_compute, data_c, packed, strides=strides, padding=padding,
                dilation=dilation, groups=groups, primfunc_name_hint="conv2d_nchwc",
            )
            self._emit_blocked(var, out, ob)
            return True

        def _absorb_zero_pad(self, data, padding):
            """Fold an explicit zero ``nn.pad`` of H/W (TF "same" padding) read only by this
            conv into the conv's own padding."""
            if not isinstance(data, relax.Var) or self.counts.get(data, 0) != 1:
                return data, padding
            bound = self.lookup_binding(data)
            if not (isinstance(bound, relax.Call) and isinstance(bound.op, _tvm_ir().Op)):
                return data, padding
            if bound.op.name != "relax.nn.pad" or str(bound.attrs.pad_mode) != "constant":
                return data, padding
            widths = [int(p) for p in bound.attrs.pad_width]
            if len(widths) != 8 or any(widths[:4]) or float(bound.attrs.pad_value) != 0.0:
                return data, padding
            top, left, bottom, right = padding
            return bound.args[0], (top + widths[4], left + widths[6], bottom + widths[5], right + widths[7])

        # ---- dense ---------------------------------------------------------------------
        def _matmul(self, var, call) -> bool:
            x, weight = call.args
            w = self._const_value(weight)
            xshape = _static_shape(x)
            if w is None or w.ndim != 2 or xshape is None or len(xshape) < 2:
                return False
            if _dtype(x) != "float32" or _dtype(call) != "float32" or w.dtype != np.float32:
                return False
            k, n = w.shape
            nb = dense_panel_width(n, self.info, self.layout)
            packed = _relax_const(pack_dense_weight(w, nb))
            out = self.builder_.call_te(
                dense_packed_compute, self.visit_expr(x), packed, out_features=n,
                primfunc_name_hint="dense_packed",
            )
            self._emit(var, out)
            return True

        # ---- element-wise --------------------------------------------------------------
        def _unary(self, var, call) -> bool:
            src = self._blocked_of(call.args[0])
            if src is None:
                return False
            blocked, block = src
            args = [blocked] + [self.visit_expr(a) for a in call.args[1:]]
            self._emit_blocked(var, relax.Call(call.op, args, call.attrs, call.ty_args), block)
            return True

        def _binary(self, var, call) -> bool:
            lhs, rhs = call.args
            out_shape = _static_shape(call)
            if out_shape is None or len(out_shape) != 4:
                return False
            sides = [self._blocked_of(lhs), self._blocked_of(rhs)]
            known = [s for s in sides if s is not None]
            if not known:
                return False
            block = known[0][1]
            channels = out_shape[1]
            new_args = []
            for arg, side in zip((lhs, rhs), sides):
                if side is not None and side[1] == block:
                    new_args.append(side[0])
                    continue
                value = self._const_value(arg)
                if value is not None:
                    packed = pack_nchw_array(value, channels, block)
                    if packed is None:
                        return False
                    new_args.append(_relax_const(packed.astype(_dtype(arg), copy=False)))
                    continue
                if _static_shape(arg) != out_shape:
                    return False
                new_args.append(self._blocked_input(arg, block))
            self._emit_blocked(var, relax.Call(call.op, new_args, call.attrs, call.ty_args), block)
            return True

        # ---- pooling -------------------------------------------------------------------
        def _blocked_pool_input(self, call):
            """(blocked input, block, blocked layout) of an NCHW pooling whose input is already
            blocked, else None (the pooling then stays in NCHW)."""
            src = self._blocked_of(call.args[0])
            a = call.attrs
            if src is None or a.layout != "NCHW" or (a.out_layout or "NCHW") != "NCHW":
                return None
            blocked, block = src
            return blocked, block, f"NCHW{block}c"

        def _pool2d(self, var, call) -> bool:
            src = self._blocked_pool_input(call)
            if src is None:
                return False
            blocked, block, layout = src
            a = call.attrs
            op = relax.op.nn.max_pool2d if call.op.name == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
            expr = op(
                blocked, pool_size=[int(p) for p in a.pool_size], strides=[int(s) for s in a.strides],
                padding=[int(p) for p in a.padding], dilation=[int(d) for d in a.dilation],
                ceil_mode=bool(a.ceil_mode), count_include_pad=bool(a.count_include_pad),
                layout=layout, out_layout=layout,
            )
            self._emit_blocked(var, expr, block)
            return True

        def _adaptive_pool2d(self, var, call) -> bool:
            src = self._blocked_pool_input(call)
            if src is None:
                return False
            blocked, block, layout = src
            a = call.attrs
            size = None if a.output_size is None else [int(s) for s in a.output_size]
            expr = relax.op.nn.adaptive_avg_pool2d(blocked, size, layout=layout, out_layout=layout)
            self._emit_blocked(var, expr, block)
            return True

        def _spatial_reduce(self, var, call) -> bool:
            src = self._blocked_of(call.args[0])
            if src is None or call.attrs.axis is None:
                return False
            axes = sorted(int(a) % 4 for a in call.attrs.axis)
            if axes != [2, 3]:
                return False
            blocked, block = src
            op = {"relax.mean": relax.op.mean, "relax.sum": relax.op.sum, "relax.max": relax.op.max}[call.op.name]
            reduced = op(blocked, axis=[2, 3], keepdims=True)
            if bool(call.attrs.keepdims):
                self._emit_blocked(var, reduced, block)
            else:  # [N, C/b, 1, 1, b] is [N, C] in memory
                reduced = self.builder_.emit(reduced, var.name + "_nchwc")
                self._emit(var, relax.op.reshape(reduced, _static_shape(call)))
            return True

    return Rewriter


@functools.lru_cache(maxsize=None)
def _fast_math_class():
    from tvm import relax, te, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def sigmoid(x):
        neg = te.compute(x.shape, lambda *i: -x(*i), name="neg")
        e = topi.fast_exp(neg)
        return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="fast_sigmoid")

    def silu(x):
        s = sigmoid(x)
        return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="fast_silu")

    def gelu(x):
        scaled = te.compute(x.shape, lambda *i: x(*i) * 0.7071067811865476, name="gelu_scaled")
        erf = topi.fast_erf(scaled)
        return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * erf(*i)), name="fast_gelu")

    def gelu_tanh(x):
        inner = te.compute(
            x.shape, lambda *i: 0.7978845608028654 * (x(*i) + 0.044715 * x(*i) * x(*i) * x(*i)), name="gelu_inner"
        )
        t = topi.fast_tanh(inner)
        return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * t(*i)), name="fast_gelu_tanh")

    replacements = {
        "relax.exp": topi.fast_exp,
        "relax.erf": topi.fast_erf,
        "relax.tanh": topi.fast_tanh,
        "relax.sigmoid": sigmoid,
        "relax.nn.silu": silu,
        "relax.nn.gelu": gelu,
        "relax.nn.gelu_tanh": gelu_tanh,
    }

    @mutator
    class FastMath(PyExprMutator):
        """Swaps transcendental ops for TOPI's polynomial versions (relative error ~3e-7).
        LLVM has no vector ``expf``/``erff``, so the exact ops become one libm call per
        element: GELU on a 64×2048 tensor took 0.25 ms exact and 0.02 ms this way."""

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, _tvm_ir().Op) or _dtype(call) != "float32":
                return call
            name = call.op.name
            if name in replacements:
                return self.builder_.call_te(replacements[name], call.args[0],
                                             primfunc_name_hint=name.split(".")[-1] + "_fast")
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis),
                                             primfunc_name_hint="softmax_fast")
            return call

        @classmethod
        def run(cls, mod):
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    rewriter = cls(mod)
                    rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
                    mod = rewriter.builder_.get()
            return mod

    return FastMath


def _relax_const(value: np.ndarray):
    """A Relax constant holding ``value`` (one copy; ``relax.const`` on numpy makes three)."""
    import tvm
    from tvm import relax

    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(value)))


def _tvm_ir():
    import tvm

    return tvm.ir


def dense_panel_width(out_features: int, info: CpuInfo, layout: LayoutKnobs = LayoutKnobs()) -> int:
    """Weight panel width: ``dense_panel_vectors`` vectors (or fewer) when that divides N,
    else the largest dividing block, else one vector with a zero-padded last panel."""
    vectors = layout.dense_panel_vectors
    while vectors >= 1:
        if out_features % (vectors * info.lanes) == 0:
            return vectors * info.lanes
        vectors //= 2
    block = channel_block(out_features, info.lanes)
    return block if block > 1 else info.lanes  # padded panel, tail handled by the bound check


def _block(expr, block: int):
    from tvm import relax

    return relax.op.layout_transform(expr, index_map=lambda n, c, h, w: (n, c // block, h, w, c % block))


def _unblock(expr, block: int):
    from tvm import relax

    return relax.op.layout_transform(expr, index_map=lambda n, co, h, w, ci: (n, co * block + ci, h, w))


# --------------------------------------------------------------------------------------------
# TIR schedules
# --------------------------------------------------------------------------------------------


def schedule_for_cpu(mod: "tvm.IRModule", target) -> "tvm.IRModule":  # noqa: F821
    """Schedule every unscheduled PrimFunc of a lowered module for an llvm CPU target.

    Our packed kernels (found by their ``schedule_rule`` block annotation) get register-tiled
    schedules; everything else gets :func:`schedule_generic`.  A schedule that raises falls
    back to the generic one, then to the function as it was, logging the function name.
    Scheduled functions carry ``tirx.is_scheduled`` so later passes leave them alone.
    """
    import tvm

    vectorizable_nearbyint()
    info = cpu_info(target)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            continue
        updates[gv] = schedule_prim_func(func, info, name=gv.name_hint)
    mod = mod.clone()  # the caller's module stays unscheduled
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


@functools.lru_cache(maxsize=1)
def vectorizable_nearbyint() -> None:
    """Mark ``tirx.nearbyint`` vectorizable, as TVM 0.27 marks round/floor/trunc: without the
    attribute the vectorizer scalarizes every loop that rounds, e.g. the int8 activation
    quantize (``clip(rint(x/s))``) ran one element at a time with branches for the clip."""
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def schedule_prim_func(func, info: CpuInfo, name: str = "func"):
    """Return ``func`` scheduled (and marked ``tirx.is_scheduled``), never raising."""
    import tvm
    from tvm import s_tir

    try:  # block-domain-aware simplification: reshape index math (i // 2048 + j) % 64 -> j
        func = s_tir.transform.StmtSimplify()(tvm.IRModule({"main": func}))["main"]
    except Exception as err:  # pragma: no cover - simplification is an optimization only
        log.debug("schedule_for_cpu: StmtSimplify failed for %s: %s", name, _first_line(err))
    kind = _kernel_kind(func)
    if kind is None:
        try:
            flat = flat_elementwise(func, info)
        except Exception as err:  # noqa: BLE001 - refusals return None; this is a bug, the generic schedule serves
            log.warning("schedule_for_cpu: flat loop failed for %s (generic schedule instead): %s", name,
                        _first_line(err))
            flat = None
        if flat is not None:
            return flat
    attempts = []
    if kind in _KERNEL_SCHEDULES:
        attempts.append((kind, _KERNEL_SCHEDULES[kind]))
    attempts.append(("generic", lambda sch, block, info: schedule_generic(sch, info)))
    for label, apply in attempts:
        try:
            sch = s_tir.Schedule(func)
            block = _annotated_block(sch, kind) if label != "generic" else None
            apply(sch, block, info)
            return sch.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception as err:  # a schedule primitive refused: try the next, safer one
            log.warning("schedule_for_cpu: %s schedule failed for %s: %s", label, name, _first_line(err))
    log.warning("schedule_for_cpu: leaving %s unscheduled", name)
    return func


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _kernel_kind(func) -> str | None:
    """The ``schedule_rule`` of the one annotated top-level block, if exactly one has it."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    kinds = []
    for block in _root_blocks(sch):
        annotations = sch.get(block).annotations
        if SCHEDULE_RULE in annotations:
            kinds.append(str(annotations[SCHEDULE_RULE]))
    return kinds[0] if len(kinds) == 1 else None


def _annotated_block(sch, kind: str):
    for block in _root_blocks(sch):
        annotations = sch.get(block).annotations
        if SCHEDULE_RULE in annotations and str(annotations[SCHEDULE_RULE]) == kind:
            return block
    raise ValueError(f"no block annotated {kind}")


def _root_blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root"))


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _is_spatial(sch, block) -> bool:
    return all(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)


def _fuse_epilogue(sch, block):
    """Inline the element-wise chain after ``block`` and return the block that writes the
    function output (a local cache copy when ``block`` writes it itself).  The
    intermediate between them gets local scope so the register tile stays on the stack."""
    blocks = _root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    index = names.index(sch.get(block).name_hint)
    after = blocks[index + 1 :]
    if not after:
        return sch.cache_write(block, 0, "local")
    for consumer in after[:-1]:
        sch.compute_inline(consumer)
    sch.set_scope(block, 0, "local")
    return after[-1]


def _schedule_pad(sch, block, info: CpuInfo) -> None:
    """Separate padding stage: parallel over rows, vector copy of each pixel's channel block."""
    loops = sch.get_loops(block)
    n, c, h, w, cb = loops
    sch.parallel(sch.fuse(n, c, h))
    if _extent(sch, cb) > 1:
        sch.vectorize(cb)


def schedule_conv2d_nchwc(
    sch, block, info: CpuInfo, knobs: ConvKnobs | None = None, sample: bool = False
) -> None:
    """Register-tiled ``NCHW[x]c`` convolution (plain, grouped or depthwise).

    Loop nest: ``parallel(n, oc_chunk, oh) / ow_outer / reductions / ow_tile (unrolled) /
    oc_block (vectorized)``: each step broadcasts one input value against one weight vector
    for ``ow_tile`` accumulators held in registers; the fused epilogue runs on the tile.
    ``sample=True`` draws ``ow_tile`` with ``sample_perfect_tile`` (the tuning template).
    """
    loops = sch.get_loops(block)
    b, oc, y, x, vec = loops[:5]
    reductions = loops[5:]
    knobs = knobs or default_conv_knobs(_extent(sch, x), _extent(sch, vec), info)
    if sample:
        budget = conv_register_budget(_extent(sch, vec), info)
        xo, xi = sch.split(x, sch.sample_perfect_tile(x, n=2, max_innermost_factor=budget))
    else:
        xo, xi = sch.split(x, [None, knobs.ow_tile])
    if len(reductions) == 4 and knobs.unroll_kw:  # ic_chunk, kh, kw, ic_block
        ric, kh, kw, rib = reductions
        reductions = [ric, kh, rib, kw]
    sch.reorder(b, oc, y, xo, *reductions, xi, vec)
    producers = [p for p in sch.get_producers(block) if "pad" in sch.get(p).name_hint]
    epilogue = _fuse_epilogue(sch, block)
    sch.reverse_compute_at(epilogue, xo)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    sch.parallel(sch.fuse(b, oc, y))
    sch.unroll(xi)
    sch.vectorize(vec)
    if knobs.unroll_kw and len(reductions) == 4:
        sch.unroll(reductions[3])
    elif len(reductions) == 2:  # depthwise: kh, kw
        sch.unroll(reductions[1])
    # Decompose last: loop annotations are checked against the still-whole reduction block.
    init = sch.decompose_reduction(block, reductions[0])
    sch.vectorize(sch.get_loops(init)[-1])
    for pad in producers:
        _schedule_pad(sch, pad, info)


def schedule_dense_packed(
    sch, block, info: CpuInfo, knobs: DenseKnobs | None = None, sample: bool = False
) -> None:
    """Register-tiled dense against ``[N/nb, K, nb]`` weight panels.

    Loop nest: ``parallel(n_panel) / m_outer / k / m_tile (unrolled) / nb (vectorized)``:
    each ``k`` step loads one weight vector row and broadcasts ``m_tile`` inputs; a panel is
    contiguous in memory, so batch-1 GEMV streams the weights at full bandwidth.
    ``sample=True`` draws ``m_tile`` and ``k_unroll`` with ``sample_perfect_tile``.
    """
    loops = sch.get_loops(block)
    *ms, j, k = loops
    m = sch.fuse(*ms) if len(ms) > 1 else ms[0]
    nb = _packed_panel_width(sch, block)
    knobs = knobs or default_dense_knobs(_extent(sch, m), nb, info)
    jo, ji = sch.split(j, [None, nb])
    if sample:
        budget = dense_register_budget(nb, info)
        mo, mi = sch.split(m, sch.sample_perfect_tile(m, n=2, max_innermost_factor=budget))
        ko, ki = sch.split(k, sch.sample_perfect_tile(k, n=2, max_innermost_factor=16))
    else:
        mo, mi = sch.split(m, [None, knobs.m_tile])
        unroll = knobs.k_unroll if _extent(sch, k) % knobs.k_unroll == 0 else 1
        ko, ki = sch.split(k, [None, unroll])
    sch.reorder(jo, mo, ko, ki, mi, ji)
    epilogue = _fuse_epilogue(sch, block)
    sch.reverse_compute_at(epilogue, mo)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    if _extent(sch, jo) >= 2 * info.num_cores or _extent(sch, mo) == 1:
        sch.parallel(jo)
    else:
        sch.parallel(sch.fuse(jo, mo))
    sch.unroll(ki)
    sch.unroll(mi)
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])


def _packed_panel_width(sch, block) -> int:
    for region in sch.get(block).reads:
        shape = _region_buffer(region).shape
        if len(shape) == 3:
            return int(shape[2])
    raise ValueError("dense_packed block without a [N/nb, K, nb] operand")


def _region_buffer(region):
    """The buffer of a block read/write region (``TensorRegion.source`` in TVM 0.27)."""
    return region.buffer if hasattr(region, "buffer") else region.source


def _inline_intermediates(sch) -> None:
    """Inline every spatial block that is not an output (where it can be)."""
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
    for block in _root_blocks(sch):
        if sch.get(block).name_hint in outputs or not _is_spatial(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # not inlinable (e.g. read by a reduction with overlap): keep it
            pass


def schedule_generic(sch, info: CpuInfo, knobs: GenericKnobs | None = None) -> None:
    """Safe schedule for anything: inline injective intermediates, then per remaining block
    parallelize the outer spatial loops and vectorize an inner spatial loop."""
    knobs = knobs or GenericKnobs(vector_lanes=info.lanes)
    _inline_intermediates(sch)
    for block in _root_blocks(sch):
        # Each primitive either applies or leaves the schedule untouched, so a block whose
        # schedule stops half way is still correct, only less optimized.
        try:
            if _is_spatial(sch, block):
                _generic_spatial(sch, block, knobs)
            else:
                _generic_reduction(sch, block, knobs)
        except Exception as err:
            log.debug("schedule_generic: block %s kept partly scheduled: %s", sch.get(block).name_hint,
                      _first_line(err))


_FLAT_BINARY = ("Add", "Sub", "Mul", "Div", "Mod", "FloorDiv", "FloorMod", "Min", "Max", "EQ", "NE", "LT", "LE",
                "GT", "GE", "And", "Or")


def flat_elementwise(func, info: CpuInfo, min_parallel_elems: int = MIN_PARALLEL_ELEMS):
    """``func`` as one flat vector loop over 1-D views of its buffers (``quant_prims``), when,
    after inlining its intermediates, it is a single block that reads every input at exactly
    the indices it writes (a residual add, a ReLU, a cast) and its innermost loop is not a
    multiple of the vector width (an NCHW tensor at 14×14, 7×7); else None.

    The generic schedule fuses such a nest and splits off the lanes, so each lane's indices
    become divisions, ``(4i + lane) // 196``, that the vectorizer leaves per lane (scalar
    code). Element-wise, the order does not matter: ``out[i] = f(a[i], b[i])`` flat."""
    from tvm import s_tir, tirx

    from lastbit.codegen.quant_prims import flat_prim_func, flat_view, vector_loop

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    _inline_intermediates(sch)  # one that will not inline leaves two blocks: not flat
    blocks = _root_blocks(sch)
    if len(blocks) != 1 or sch.get(root).alloc_buffers or not _is_spatial(sch, blocks[0]):
        return None
    block = blocks[0]
    stmt, loops = sch.get(block), sch.get_loops(block)
    lanes = info.lanes
    if not loops or len(loops) != len(stmt.iter_vars) or _extent(sch, loops[-1]) % lanes == 0:
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or stmt.init is not None or stmt.match_buffers:
        return None
    out = _region_buffer(body)
    shape = [int(d) for d in out.shape]

    def matches(index, var, extent: int) -> bool:  # the var itself, or 0 on a unit axis
        return index.same_as(var) or (extent == 1 and isinstance(index, tirx.IntImm) and int(index) == 0)

    def same_index(indices) -> bool:
        return len(indices) == len(ivars) and all(matches(i, v, d) for i, v, d in zip(indices, ivars, shape))

    if not same_index(body.indices):
        return None
    views: list = []  # (flat view, buffer) per buffer the block touches

    def view(buffer):
        for flat, source in views:
            if source.same_as(buffer):
                return flat
        views.append(flat_view(buffer, buffer.name + "_flat"))
        return views[-1][0]

    def rebuild(expr, i):
        kind = type(expr).__name__
        if kind in ("BufferLoad", "TensorLoad"):  # TVM 0.27 builds loads as tvm.ir.TensorLoad
            buffer = _region_buffer(expr)
            if [int(d) for d in buffer.shape] != shape or not same_index(expr.indices):
                raise _NotFlat(buffer.name)
            return tirx.BufferLoad(view(buffer), [i])
        if kind in ("IntImm", "FloatImm", "StringImm"):
            return expr
        if kind == "Var":
            if any(expr.same_as(v) for v in ivars):
                raise _NotFlat("index used as a value")
            return expr
        if kind in _FLAT_BINARY:
            return type(expr)(rebuild(expr.a, i), rebuild(expr.b, i))
        if kind == "Not":
            return tirx.Not(rebuild(expr.a, i))
        if kind == "Cast":
            return tirx.Cast(str(expr.ty), rebuild(expr.value, i))
        if kind == "Select":
            return tirx.Select(rebuild(expr.condition, i), rebuild(expr.true_value, i), rebuild(expr.false_value, i))
        if kind == "Call":
            return tirx.call_intrin(str(expr.ty), expr.op.name, *(rebuild(a, i) for a in expr.args))
        raise _NotFlat(kind)

    realize = sch.mod["main"].body.block.body  # root block -> the loop nest -> the block's realize
    while isinstance(realize, tirx.For):
        realize = realize.body
    if not isinstance(realize, s_tir.SBlockRealize) or any(
            not matches(v, sch.get(lp).loop_var, _extent(sch, lp)) for v, lp in zip(realize.iter_values, loops)):
        return None
    try:
        rebuild(body.value, tirx.Var("probe", "int32"))
    except _NotFlat:
        return None

    def store(i):
        return tirx.BufferStore(view(out), rebuild(body.value, i), [i])

    total = math.prod(shape)
    row = shape[-1] * (shape[-2] if len(shape) > 1 else 1)
    if total >= min_parallel_elems and total // row > 1:
        r = tirx.Var("row", "int32")
        per_row = vector_loop(row, lanes, lambda j: store(r * row + j), "i")
        loop = tirx.For(r, 0, total // row, tirx.ForKind.PARALLEL, per_row)
    else:
        loop = vector_loop(total, lanes, store, "i")
    flat = flat_prim_func(list(func.params), views, loop)
    for key, value in (func.attrs.items() if func.attrs is not None else ()):
        flat = flat.with_attr(key, value)
    return flat.with_attr("tirx.is_scheduled", True)


class _NotFlat(Exception):
    """An expression :func:`flat_elementwise` cannot rewrite to flat indices."""


def _generic_spatial(sch, block, knobs: GenericKnobs) -> None:
    """Element-wise blocks: one flat loop, vectorized, parallel outside.  Anything with index
    arithmetic (pad, transpose, layout transform, broadcast): keep the loop nest, vectorize
    the innermost loop, parallelize the rest, so no lane needs a division."""
    loops = sch.get_loops(block)
    if not loops:
        return
    lanes = knobs.vector_lanes
    total = 1
    for lp in loops:
        total *= _extent(sch, lp)
    if _is_elementwise(sch, block):
        loops = [sch.fuse(*loops)] if len(loops) > 1 else loops
    inner = loops[-1]
    extent = _extent(sch, inner)
    vec = None
    if extent % lanes == 0 and extent > lanes:
        inner_outer, vec = sch.split(inner, [None, lanes])
        outer = loops[:-1] + [inner_outer]
    elif 1 < extent <= lanes:
        vec, outer = inner, loops[:-1]
    else:
        outer = loops
    if outer and total >= knobs.min_parallel_elems:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if _extent(sch, fused) > 1:
            sch.parallel(fused)
    if vec is not None:
        sch.vectorize(vec)


def _is_elementwise(sch, block) -> bool:
    """Every read of the output's rank indexes exactly like the write."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    write = [str(r.min) for r in stmt.writes[0].region]
    for region in stmt.reads:
        mins = [str(r.min) for r in region.region]
        if len(mins) == len(write) and mins != write:
            return False
        if len(mins) != len(write) and any(int(getattr(r.extent, "value", 0)) != 1 for r in region.region):
            return False
    return True


def _generic_reduction(sch, block, knobs: GenericKnobs) -> None:
    loops = sch.get_loops(block)
    iter_types = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
    # Loops map to iter vars one to one right after legalization; bail out otherwise.
    if len(loops) != len(iter_types):
        return
    spatial = [lp for lp, t in zip(loops, iter_types) if t == 0]
    reduce = [lp for lp, t in zip(loops, iter_types) if t != 0]
    if not spatial or not reduce:
        return
    work = 1
    for lp in loops:
        work *= _extent(sch, lp)
    lanes = knobs.vector_lanes
    last = spatial[-1]
    vec = None
    if _extent(sch, last) % lanes == 0:
        last_outer, vec = sch.split(last, [None, lanes])
        spatial = spatial[:-1] + [last_outer]
    elif _extent(sch, last) < lanes and _extent(sch, last) > 1:
        vec = last
        spatial = spatial[:-1]
    sch.reorder(*spatial, *reduce, *([vec] if vec is not None else []))
    if spatial:
        outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if work >= knobs.min_parallel_elems and _extent(sch, outer) > 1:
            sch.parallel(outer)
    if vec is not None:
        sch.vectorize(vec)
        init = sch.decompose_reduction(block, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])


def tuning_space(target):
    """The same templates as a MetaSchedule design space (``ScheduleFn``): packed kernels
    sample their tile sizes (``sample_perfect_tile``), everything else gets the generic
    schedule.  Tasks must come from a module that went through :func:`prepare_for_cpu`."""
    from tvm.s_tir import meta_schedule as ms

    info = cpu_info(target)

    def apply(sch):
        kind = _kernel_kind(sch.mod["main"])
        if kind in _KERNEL_SCHEDULES:
            _KERNEL_SCHEDULES[kind](sch, _annotated_block(sch, kind), info, sample=True)
        else:
            schedule_generic(sch, info)
        return sch

    return ms.space_generator.ScheduleFn(apply)


_KERNEL_SCHEDULES = {
    CONV2D_NCHWC: schedule_conv2d_nchwc,
    DEPTHWISE_NCHWC: schedule_conv2d_nchwc,
    DENSE_PACKED: schedule_dense_packed,
}

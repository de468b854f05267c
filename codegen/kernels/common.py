"""Pieces every integer kernel family shares: code-set lookup, layer checks, TE building
blocks for conv2d, the VNNI tensor intrinsic, and build/run helpers: ``build_for_host`` (one
kernel in this process: tests, benchmarks) and ``kernels_module`` (kernels as ``call_tir`` in
a Relax module, which a bundle carries to any target, qemu included).

The numpy parts are plain functions testable without TVM; everything touching TVM imports it
lazily.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, KernelError

log = logging.getLogger(__name__)

VNNI_INTRIN = "lastbit_dot_16x4_u8i8i32_vnni"
X86_VNNI_FEATURES = frozenset({"avx512bw", "avx512vnni"})


# --------------------------------------------------------------------------------------------
# Code sets (numpy)
# --------------------------------------------------------------------------------------------


def code_levels(code_set: str) -> np.ndarray:
    """The sorted int levels of a named code set ("pow2-4", "ternary", "int8", ...)."""
    from lastbit.passes.pow2_projection import QuantizationError
    from lastbit.passes.pow2_projection import code_set as resolve

    try:
        return np.asarray(resolve(code_set).levels, dtype=np.int32)
    except QuantizationError as err:
        raise KernelError(str(err)) from None


def code_indices(codes: np.ndarray, levels: np.ndarray, where: str) -> np.ndarray:
    """Index of every code in ``levels`` (uint8); a code outside the set is an error naming it."""
    codes = np.asarray(codes)
    idx = np.searchsorted(levels, codes.astype(np.int32))
    idx = np.clip(idx, 0, len(levels) - 1)
    bad = levels[idx] != codes
    if np.any(bad):
        value = int(codes[bad].flat[0])
        raise KernelError(f"{where}: weight code {value} is not in the code set {levels.tolist()}")
    return idx.astype(np.uint8)


def check_codes_shape(layer: IntLayer, codes: np.ndarray, kernel: str) -> np.ndarray:
    codes = np.asarray(codes)
    if tuple(codes.shape) != tuple(layer.weight_shape):
        raise KernelError(f"{kernel}: codes have shape {codes.shape}, the layer says {layer.weight_shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise KernelError(f"{kernel}: codes must be integers, got {codes.dtype}")
    return codes


def conv_output_shape(layer: IntLayer) -> tuple[int, int, int, int]:
    """NCHW output shape of a conv2d layer (padding is top, left, bottom, right)."""
    n, c, h, w = layer.data_shape
    o, cg, kh, kw = layer.weight_shape
    sh, sw = layer.strides
    dh, dw = layer.dilation
    pt, pl, pb, pr = layer.padding
    if c != cg * layer.groups or o % layer.groups:
        raise KernelError(
            f"conv2d: input has {c} channels, weight {layer.weight_shape} with groups={layer.groups}"
        )
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise KernelError(f"conv2d: kernel {kh}x{kw} does not fit input {h}x{w} with padding {layer.padding}")
    return n, o, oh, ow


def output_shape(layer: IntLayer) -> tuple[int, ...]:
    if layer.op == "dense":
        return (layer.data_shape[0], layer.weight_shape[0])
    return conv_output_shape(layer)


def layer_macs(layer: IntLayer) -> int:
    """Useful multiply-accumulates of one call of ``layer`` (no padding lanes or blocks): what a
    roofline divides by the machine's peak MAC rate."""
    if layer.op == "dense":
        return int(np.prod(layer.data_shape)) * layer.weight_shape[0]
    n, o, oh, ow = conv_output_shape(layer)
    return n * o * oh * ow * int(np.prod(layer.weight_shape[1:]))


def check_int8_codes(layer: IntLayer, codes: np.ndarray, kernel: str) -> np.ndarray:
    """``codes`` of the layer's weight shape, every value in int8, as int8."""
    codes = check_codes_shape(layer, codes, kernel)
    if codes.size and (codes.min() < -128 or codes.max() > 127):
        raise KernelError(f"{kernel}: weight codes outside int8: [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int8)


def first_missing(features: frozenset[str], needed: frozenset[str]) -> str | None:
    missing = sorted(needed - features)
    return f"target lacks {', '.join(missing)}" if missing else None


# --------------------------------------------------------------------------------------------
# TE building blocks
# --------------------------------------------------------------------------------------------


def padded_input(x, layer: IntLayer, dtype: str = "int32"):
    """``x`` (NCHW int8) zero-padded by the layer's padding and cast to ``dtype``."""
    from tvm import te, tirx

    n, c, h, w = layer.data_shape
    pt, pl, pb, pr = layer.padding

    def body(i, j, y, z):
        inside = tirx.all(y >= pt, y < pt + h, z >= pl, z < pl + w)
        return tirx.if_then_else(inside, x[i, j, y - pt, z - pl].astype(dtype), tirx.const(0, dtype))

    return te.compute((n, c, h + pt + pb, w + pl + pr), body, name="data_pad")


def conv2d_reduce(layer: IntLayer, data_pad, product):
    """``acc[n, o, y, x] = Σ_{c, i, j} product(data_pad[...], o, c, i, j)`` in int32, with groups.

    ``product(value, o, c, i, j)`` is the family's multiply (shift-add, decoded int8, ...)."""
    from tvm import te

    n, o, oh, ow = conv_output_shape(layer)
    _, cg, kh, kw = layer.weight_shape
    sh, sw = layer.strides
    dh, dw = layer.dilation
    og = o // layer.groups
    rc = te.reduce_axis((0, cg), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def body(b, oc, y, z):
        ic = (oc // og) * cg + rc if layer.groups > 1 else rc
        value = data_pad[b, ic, y * sh + ri * dh, z * sw + rj * dw]
        return te.sum(product(value, oc, rc, ri, rj), axis=[rc, ri, rj])

    return te.compute((n, o, oh, ow), body, name="acc")


def row_vector_choices(layer: IntLayer) -> list[int]:
    """Vector widths that divide the conv output row (so no vector loop carries a predicate)."""
    ow = conv_output_shape(layer)[3]
    return [v for v in (1, 2, 4, 8, 16, 32) if ow % v == 0]


def schedule_conv_generic(sch, layer: IntLayer, lanes=None) -> None:
    """Default CPU schedule of a direct conv2d: parallel over (batch, channel), the output row
    vectorized in chunks of ``lanes`` (an int, or a sampled variable when tuning) with the
    reduction outside it, the pad stage inlined, the kernel-width loop unrolled."""
    sch.compute_inline(sch.get_sblock("data_pad"))  # the cast/pad stage of padded_input
    if lanes is None:
        lanes = max(v for v in row_vector_choices(layer) if v <= 16)
    block = sch.get_sblock("acc")
    b, oc, y, z, rc, ri, rj = sch.get_loops(block)
    zo, zi = sch.split(z, [None, lanes])
    sch.reorder(b, oc, y, zo, rc, ri, rj, zi)
    sch.parallel(sch.fuse(b, oc))
    sch.unroll(rj)
    sch.vectorize(zi)  # before decompose_reduction: the update block alone is not vectorizable
    sch.decompose_reduction(block, rc)


def conv_tuning_space(layer: IntLayer):
    """Samples the output-row vector width of :func:`schedule_conv_generic`."""
    choices = row_vector_choices(layer)

    def space(sch) -> None:
        lanes = choices[0] if len(choices) == 1 else sch.sample_categorical(choices, [1 / len(choices)] * len(choices))
        schedule_conv_generic(sch, layer, lanes)

    return space


# --------------------------------------------------------------------------------------------
# VNNI: vpdpbusd as a tensor intrinsic (registered once, without importing all of
# tvm.s_tir.tensor_intrin, which takes ~25 s; the upstream one also passes the wrong operand
# types for this LLVM: vpdpbusd.512 takes <64 x i8>, not <16 x i32>)
# --------------------------------------------------------------------------------------------


def dot4_desc(a_dtype: str, lanes: int, acc_scope: str):
    """The TensorIR description both dot-product intrinsics tensorize:
    ``C[lanes] += Σ_k A[k] · B[i, k]`` over k < 4, A of ``a_dtype``, B int8, C int32."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=acc_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@functools.lru_cache(maxsize=None)
def register_vnni_intrin(acc_scope: str = "global") -> str:
    """Register ``C[16] += Σ_k u8 A[k] · s8 B[i, k]`` (k < 4) as one vpdpbusd; returns its name.

    ``acc_scope`` is the accumulator's buffer scope (tensorize matches scopes): "local" for a
    register tile that LLVM keeps in zmm registers across the reduction (int8-vnni-conv)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = VNNI_INTRIN if acc_scope == "global" else f"{VNNI_INTRIN}_{acc_scope}_acc"

    desc = dot4_desc("uint8", 16, acc_scope)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope=acc_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(name, desc, impl, override=True)
    return name


# --------------------------------------------------------------------------------------------
# Build and run one kernel (tests, benchmarks; the lowering uses the PrimFunc itself)
# --------------------------------------------------------------------------------------------


def scheduled_module(kernel: IntKernel, layer: IntLayer, features: frozenset[str]):
    """``prim_func(layer)`` with the kernel's default schedule applied, as an IRModule."""
    import tvm
    from tvm import s_tir

    func = kernel.prim_func(layer).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    kernel.schedule(sch, layer, features)
    return sch.mod


@dataclass
class BuiltKernel:
    """A kernel compiled for the host, with its packed weights already on the device."""

    lib: object
    packed: list
    out_shape: tuple[int, ...]

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        import tvm

        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(self.out_shape, np.int32), dev)
        self.lib(tvm.runtime.tensor(np.ascontiguousarray(x_q), dev), *self.packed, out)
        return out.numpy()

    def time_ms(self, x_q: np.ndarray, number: int = 10, repeat: int = 5) -> float:
        """Median over ``repeat`` runs of the mean of ``number`` warm calls, in ms."""
        import tvm

        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(self.out_shape, np.int32), dev)
        args = [tvm.runtime.tensor(np.ascontiguousarray(x_q), dev), *self.packed, out]
        self.lib(*args)
        timer = self.lib.time_evaluator("main", dev, number=number, repeat=repeat)
        return float(np.median(timer(*args).results) * 1e3)

    def rotating_call(self, x_q: np.ndarray, cache_bytes: int):
        """A no-argument function that runs the kernel once, rotating over enough copies of
        the packed weights (together over twice ``cache_bytes``) that each call reads its
        weights from memory, not from a cache the previous call warmed."""
        import tvm

        dev = tvm.cpu()
        size = sum(a.numpy().nbytes for a in self.packed)
        copies = max(2, -(-2 * cache_bytes // max(size, 1)) + 1)
        sets = [self.packed] + [[tvm.runtime.tensor(a.numpy(), dev) for a in self.packed] for _ in range(copies - 1)]
        x = tvm.runtime.tensor(np.ascontiguousarray(x_q), dev)
        out = tvm.runtime.tensor(np.zeros(self.out_shape, np.int32), dev)
        state = {"next": 0}

        def call() -> None:
            self.lib(x, *sets[state["next"]], out)
            state["next"] = (state["next"] + 1) % copies

        for _ in range(copies):
            call()
        return call

    def time_from_memory_ms(self, x_q: np.ndarray, cache_bytes: int, number: int = 8, repeat: int = 5) -> float:
        """Like :meth:`time_ms` with the weights read from memory (see :meth:`rotating_call`);
        includes the Python call overhead (µs)."""
        import time

        call = self.rotating_call(x_q, cache_bytes)
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                call()
            runs.append((time.perf_counter() - start) / number)
        return float(np.median(runs) * 1e3)


def build_for_host(kernel: IntKernel, layer: IntLayer, codes: np.ndarray, target=None) -> BuiltKernel:
    """Pack ``codes``, schedule and compile the kernel for this machine (x86 host target)."""
    import tvm

    from lastbit.targets import get_target

    host = get_target("x86_64-linux-gnu")
    features = host.feature_set()
    reason = kernel.supports(layer, features)
    if reason is not None:
        raise KernelError(f"kernel '{kernel.name}' cannot serve {layer.op} {layer.weight_shape}: {reason}")
    mod = scheduled_module(kernel, layer, features)
    lib = tvm.tirx.build(mod, target=target or host.tvm())
    dev = tvm.cpu()
    packed = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in kernel.pack(layer, codes)]
    return BuiltKernel(lib, packed, output_shape(layer))


def kernels_module(cases: list[tuple], features: frozenset[str]):
    """A Relax module whose ``main(x_0, x_1, ...)`` runs each (kernel, layer, codes) case on its
    own input through ``call_tir`` with the packed weights as constants, returning the tuple of
    accumulators: the unit a bundle (``codegen.bundle.build_bundle``) can carry to any target.
    A case of four, (kernel, layer, codes, :class:`FusedArgs`), runs the kernel's fused form:
    float32 input and output, the reciprocal scale, bias and scale as constants."""
    import tvm
    from tvm import relax, s_tir

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x_{i}", relax.TensorType(case[1].data_shape, "int8" if len(case) == 3 else "float32"))
              for i, case in enumerate(cases)]
    with bb.function("main", params):
        with bb.dataflow():
            outs = []
            for i, (case, x) in enumerate(zip(cases, params)):
                kernel, layer, codes, *fused = case
                func = kernel.prim_func(layer) if not fused else kernel.fused_prim_func(layer, fused[0].io)
                sch = s_tir.Schedule(tvm.IRModule({"main": func}))
                kernel.schedule(sch, layer, features)
                gv = bb.add_func(sch.mod["main"], f"{kernel.name}_{layer.op}_{i}")
                consts = [relax.const(np.ascontiguousarray(a)) for a in kernel.pack(layer, codes)]
                if fused:
                    args = fused[0]
                    consts = [relax.const(np.array(args.inv, np.float32)), *consts,
                              relax.const(np.asarray(args.bias_q, np.int32)),
                              relax.const(np.asarray(args.scale, np.float32))]
                out_ty = relax.TensorType(output_shape(layer), "int32" if not fused else "float32")
                outs.append(bb.emit(relax.call_tir(gv, relax.Tuple([x, *consts]), out_ty=out_ty)))
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    return bb.get()


@dataclass(frozen=True)
class FusedArgs:
    """What a fused kernel takes besides its input and packed weights (:func:`kernels_module`)."""

    io: object  # kernels.FusedIO
    inv: float  # float32 reciprocal activation scale
    bias_q: np.ndarray  # int32 [O]
    scale: np.ndarray  # float32 [O]

"""``lut-neon`` (aarch64) / ``lut-neon-v7`` (armv7): the ``lut`` kernel's idea on ARM NEON,
dense and conv2d (groups = 1, as an im2col GEMM): packed low-bit codes decoded by a NEON
table lookup, multiplied by widening int8 multiply-adds.

aarch64 decodes 16 rows at once with ``tbl`` (16-entry table: any code set of ≤ 16 levels);
armv7 decodes 8 with ``vtbl1`` (8 entries: ≤ 8 levels, i.e. up to pow2-4). Products of an
int8 activation and a small code fit int16, so they are accumulated by ``smlal`` into int16
partial sums over chunks short enough never to overflow, then widened into int32: per 16
weights a shift, a mask, one ``tbl``, a broadcast and two ``smlal``. ``shift-add`` needs a
shift, a compare, a select and a conditional negate per weight and int32 lane. It is in no
ARM strategy: the direct int8 kernels of ``neon_int.py`` run fewer instructions (the decode
costs a shift, a mask and a ``tbl`` per 16 weights where they load the int8 weights once per
register tile; benchmarks/arm_insn_count.py counts both).

The targets tell the two NEON flavours apart by the features ``aarch64`` / ``armv7``.

Layout (``pack``): the ``lut`` field layout with blocks of one reduction element:
    W uint8 [N/L, K/8, bits, L]    L = 16 (aarch64) or 8 (armv7) rows per block
    lut int8 [L]                   levels, padded
"""

from __future__ import annotations

import functools

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    check_codes_shape,
    code_indices,
    code_levels,
    conv_output_shape,
)
from lastbit.codegen.kernels.lut import (
    GROUP,
    code_bits,
    gemm_shape,
    im2col_element,
    pack_fields,
    unpack_code,
)

# (lanes, LLVM table-lookup intrinsic, most levels its table holds, feature naming the ISA)
AARCH64 = (16, "llvm.aarch64.neon.tbl1", 16, "aarch64")
ARMV7 = (8, "llvm.arm.neon.vtbl1", 8, "armv7")


def pack(flavour, layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    lanes, _, table_size, _ = flavour
    codes = check_codes_shape(layer, codes, "lut-neon")
    codes = codes.reshape(codes.shape[0], -1)
    levels = code_levels(layer.code_set)
    if len(levels) > table_size:
        raise KernelError(f"lut-neon: {layer.code_set} has {len(levels)} levels, the table holds {table_size}")
    idx = code_indices(codes, levels, f"lut-neon {layer.op} {layer.weight_shape}")
    packed = pack_fields(idx, code_bits(levels), rows=lanes, depth=1)[..., 0]  # [N/L, K/8, bits, L]
    table = np.zeros(lanes, np.int8)
    table[: len(levels)] = levels
    return [np.ascontiguousarray(packed), table]


def supports(flavour, layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    if layer.op == "conv2d" and layer.groups != 1:
        return f"conv2d with groups={layer.groups} (im2col GEMM needs groups=1)"
    missing = sorted({"neon", flavour[3]} - features)
    if missing:
        return f"target lacks {', '.join(missing)}"
    try:
        levels = code_levels(layer.code_set)
    except KernelError as err:
        return str(err)
    if len(levels) > flavour[2]:
        return f"code set {layer.code_set} has {len(levels)} levels; the table lookup holds {flavour[2]}"
    return None


def prim_func(flavour, layer: IntLayer):
    """x_q int8, W, lut → acc int32 (dense [M, N]; conv2d NCHW). Needs :func:`schedule`: the
    lookup is a NEON ``tbl`` that only exists once the decode loop is vectorized."""
    from tvm import te, tirx

    lanes, intrinsic, _, _ = flavour
    m, k, n = gemm_shape(layer)
    levels = code_levels(layer.code_set)
    bits = code_bits(levels)
    blocks, groups = -(-n // lanes), -(-k // GROUP)
    x = te.placeholder(layer.data_shape, "int8", name="x_q")
    w = te.placeholder((blocks, groups, bits, lanes), "uint8", name="w_packed")
    lut = te.placeholder((lanes,), "int8", name="lut")
    element = im2col_element(layer, x) if layer.op == "conv2d" else (lambda i, j: x[i, j])
    x_rows = te.compute(
        (m, groups * GROUP),
        lambda i, j: tirx.if_then_else(j < k, element(i, tirx.min(j, k - 1)), tirx.const(0, "int8")),
        name="x_rows",
    )

    def decode(o, kk, ri):
        code = unpack_code(lambda f: w[o, kk // GROUP, f, ri], kk % GROUP, bits)
        return tirx.call_llvm_pure_intrin("int8", intrinsic, lut[ri], code.astype("int8"))

    wdec = te.compute((blocks, groups * GROUP, lanes), decode, name="w_decoded")
    # int16 partial sums over chunks short enough never to overflow (|x| ≤ 128, |w| ≤ max
    # level): one widening multiply-accumulate (smlal) per 8 products instead of three;
    # int32 "partials" (one chunk) for sets with levels past 16
    chunk = chunk_groups(levels, groups) * GROUP
    dtype = partial_dtype(levels)
    rk = te.reduce_axis((0, chunk), name="k")
    partial = te.compute(
        (m, blocks * lanes, groups * GROUP // chunk),
        lambda i, j, c: te.sum(
            x_rows[i, c * chunk + rk].astype(dtype) * wdec[j // lanes, c * chunk + rk, j % lanes].astype(dtype),
            axis=rk,
        ),
        name="partial",
    )
    rc = te.reduce_axis((0, groups * GROUP // chunk), name="kc")
    acc = te.compute((m, blocks * lanes), lambda i, j: te.sum(partial[i, j, rc].astype("int32"), axis=rc), name="acc")
    if layer.op == "conv2d":
        b, _, oh, ow = conv_output_shape(layer)
        out = te.compute((b, n, oh, ow), lambda bi, o, y, z: acc[(bi * oh + y) * ow + z, o], name="out")
    else:
        out = te.compute((m, n), lambda i, j: acc[i, j], name="out")
    return te.create_prim_func([x, w, lut, out])


def partial_dtype(levels: np.ndarray) -> str:
    """int16 partial sums when even one group of 8 products cannot overflow them (every set up
    to pow2-16), else int32 (pow2-32, pow2-64: 8·128·64 > 32767)."""
    return "int16" if GROUP * 128 * int(np.abs(levels).max()) <= 32767 else "int32"


def chunk_groups(levels: np.ndarray, groups: int) -> int:
    """Groups of 8 reduction elements per partial sum: with int16 partials the most (dividing
    ``groups``) whose worst case, 8·groups·128·max|level|, stays within int16."""
    if partial_dtype(levels) == "int32":
        return groups
    bound = 32767 // (GROUP * 128 * int(np.abs(levels).max()))
    return max(d for d in range(1, min(groups, bound) + 1) if groups % d == 0)


def _apply(sch, flavour, layer: IntLayer) -> None:
    lanes = flavour[0]
    m = gemm_shape(layer)[0]
    block = sch.get_sblock("acc")
    i, j, rc = sch.get_loops(block)
    jo, ji = sch.split(j, [None, lanes])
    if m == 1:
        sch.reorder(jo, i, rc, ji)
    else:
        sch.reorder(jo, rc, i, ji)
    sch.parallel(jo)
    sch.vectorize(ji)
    sch.decompose_reduction(block, rc)
    part = sch.get_sblock("partial")
    sch.compute_at(part, i if m > 1 else rc)
    pj, rk = sch.get_loops(part)[-2:]
    kg, t = sch.split(rk, [None, GROUP])
    sch.reorder(kg, t, pj)
    sch.vectorize(pj)
    sch.unroll(t)
    dec = sch.get_sblock("w_decoded")
    sch.compute_at(dec, t if m == 1 else rc)
    dec_loops = sch.get_loops(dec)
    sch.vectorize(dec_loops[-1])
    if m > 1:
        sch.unroll(dec_loops[-2])
    sch.decompose_reduction(part, kg)
    if m == 1:
        sch.compute_inline(sch.get_sblock("x_rows"))
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    if layer.op == "dense" and layer.weight_shape[0] % lanes == 0:
        _, v = sch.split(loops[-1], [None, lanes])
        sch.vectorize(v)


def schedule(flavour, sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Parallel over L-row blocks; per reduction element decode one L-lane vector (batch 1) or
    a chunk reused by every row (batch > 1), multiply-accumulate into int16 partial sums
    (smlal), widen each chunk's sum into the int32 accumulators."""
    _apply(sch, flavour, layer)


def tuning_space(flavour, layer: IntLayer, features: frozenset[str]):
    """The int16 chunk is fixed by overflow, so the knob left is LLVM's unroll depth."""

    def space(sch) -> None:
        _apply(sch, flavour, layer)
        step = sch.sample_categorical([0, 16, 64, 512], [0.25] * 4)
        sch.annotate(sch.get_loops(sch.get_sblock("acc_update"))[0], "pragma_auto_unroll_max_step", step)

    return space


def _kernel(name: str, flavour, what: str) -> IntKernel:
    return register_kernel(
        IntKernel(
            name=name,
            supports=functools.partial(supports, flavour),
            pack=functools.partial(pack, flavour),
            prim_func=functools.partial(prim_func, flavour),
            schedule=functools.partial(schedule, flavour),
            tuning_space=functools.partial(tuning_space, flavour),
            description=f"packed ≤4-bit codes decoded by {what}, widening int8 MACs; dense and conv2d",
        )
    )


LUT_NEON = _kernel("lut-neon", AARCH64, "NEON tbl (aarch64, ≤ 16 levels)")
LUT_NEON_V7 = _kernel("lut-neon-v7", ARMV7, "NEON vtbl (armv7, ≤ 8 levels)")

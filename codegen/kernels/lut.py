"""``lut``: dense and conv2d (groups = 1, as an im2col GEMM) with low-bit weight codes
(≤ 16 levels: binary, ternary, pow2-2 … pow2-64) on x86 with AVX-512 VNNI: the packed codes
are decoded in registers by a 16-entry table lookup (``vpshufb``) and multiplied by
``vpdpbusd``.

Why this shape: a batch-1 dense layer is bound by reading its weights, so the weights must stay
packed (3 bits for pow2-4) all the way into registers, and unpacking must cost fewer cycles than
the memory needs. Per 64 weights the inner loop runs a few byte shifts/masks to gather each
code's bits, one ``vpshufb`` (code → int8 level, the table is data, so any code set of ≤ 16
levels works) and one ``vpdpbusd``. Per-element shifts (``shift_add``) cost about twice that.
At batch > 1 the decoded tile is reused across rows, which is what TVM-NOTES found shift-add
lacked. (T-MAC tables activation sums instead; with int8 activations their tables would be
int16 and twice the lookups, so decode-then-dot is the better fit for our integer contract.)

Layout (``pack``): output rows in blocks of 16, the reduction in blocks of 4 (the 16×4 int8
operand of ``vpdpbusd``), eight such blocks per group. A code of ``b`` bits is split into
fields of widths ``FIELDS[b]`` (3 → 2 + 1); each field of the eight blocks of a group is stored
lane-wise, so unpacking block ``t`` is a constant shift and mask on whole 64-byte vectors, with
no shuffles:

    W  uint8 [N/16, K/32, b, 16, 4]   byte f of lane (i, k) holds field bits of blocks t
    lut int8 [64]                     levels, padded to 16, repeated per 128-bit lane
    rowsum int32 [N]                  Σ_k codes[n, k]

``vpdpbusd`` multiplies unsigned by signed bytes, so activations enter as ``x + 128`` (uint8)
and ``128·rowsum`` is subtracted at the end: exact for every int8 input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    X86_VNNI_FEATURES,
    check_codes_shape,
    code_indices,
    code_levels,
    conv_output_shape,
    first_missing,
    register_vnni_intrin,
)

ROWS = 16  # output rows per vpdpbusd
DEPTH = 4  # reduction elements per vpdpbusd lane
GROUP = 8  # blocks whose fields share one byte
LANES = ROWS * DEPTH  # 64 bytes: one zmm register
FIELDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
MAX_LEVELS = 16
M_ALIGN = 8  # GEMM rows are padded to this when batch > 1


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def code_bits(levels: np.ndarray) -> int:
    return max(1, int(np.ceil(np.log2(len(levels)))))


def padded_sizes(n: int, k: int, rows: int = ROWS, depth: int = DEPTH) -> tuple[int, int]:
    return -(-n // rows) * rows, -(-k // (GROUP * depth)) * (GROUP * depth)


def pack_fields(idx: np.ndarray, bits: int, rows: int = ROWS, depth: int = DEPTH) -> np.ndarray:
    """Code indices [N, K] (< 2**bits) → the lane-wise field layout
    [N/rows, K/(8·depth), bits, rows, depth] (rows × depth bytes = one vector register)."""
    n, k = idx.shape
    np_, kp = padded_sizes(n, k, rows, depth)
    full = np.zeros((np_, kp), np.uint8)
    full[:n, :k] = idx
    # [no, ni, kg, t, ki] -> [no, kg, t, ni, ki]
    blocks = full.reshape(np_ // rows, rows, kp // (GROUP * depth), GROUP, depth).transpose(0, 2, 3, 1, 4)
    out = np.zeros((np_ // rows, kp // (GROUP * depth), bits, rows, depth), np.uint8)
    row, offset = 0, 0
    for width in FIELDS[bits]:
        per_byte = 8 // width
        field = (blocks >> offset) & ((1 << width) - 1)
        for t in range(GROUP):
            out[:, :, row + t // per_byte] |= (field[:, :, t] << ((t % per_byte) * width)).astype(np.uint8)
        row += width
        offset += width
    return out


def unpack_fields(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_fields` (for tests and debugging)."""
    no, kg, _, rows, depth = packed.shape
    idx = np.zeros((no, kg, GROUP, rows, depth), np.uint8)
    row, offset = 0, 0
    for width in FIELDS[bits]:
        per_byte = 8 // width
        for t in range(GROUP):
            field = (packed[:, :, row + t // per_byte] >> ((t % per_byte) * width)) & ((1 << width) - 1)
            idx[:, :, t] |= (field << offset).astype(np.uint8)
        row += width
        offset += width
    return idx.transpose(0, 3, 1, 2, 4).reshape(no * rows, kg * GROUP * depth)[:n, :k]


def unpack_code(byte_of, t, bits: int):
    """The TE expression of the code of block ``t`` (0..7): its fields gathered from the
    group's bytes, ``byte_of(f)`` being the f-th byte of the lane (see :func:`pack_fields`)."""
    from tvm import tirx

    code = None
    row, offset = 0, 0
    for width in FIELDS[bits]:
        per_byte = 8 // width
        shift = ((t % per_byte) * width).astype("uint8")
        field = (byte_of(row + t // per_byte) >> shift) & tirx.const((1 << width) - 1, "uint8")
        code = field if code is None else code | (field << tirx.const(offset, "uint8"))
        row += width
        offset += width
    return code


def decode_table(levels: np.ndarray) -> np.ndarray:
    """The vpshufb table: level of code c at byte c of every 16-byte lane."""
    table = np.zeros(MAX_LEVELS, np.int8)
    table[: len(levels)] = levels
    return np.tile(table, LANES // MAX_LEVELS)


def pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_codes_shape(layer, codes, "lut")
    codes = codes.reshape(codes.shape[0], -1)  # conv2d: OIHW -> [O, C·KH·KW], the im2col order
    levels = code_levels(layer.code_set)
    idx = code_indices(codes, levels, f"lut {layer.op} {layer.weight_shape}")
    rowsum = codes.astype(np.int64).sum(axis=1).astype(np.int32)
    return [pack_fields(idx, code_bits(levels)), decode_table(levels), rowsum]


# --------------------------------------------------------------------------------------------
# Support
# --------------------------------------------------------------------------------------------


def supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    if layer.op == "conv2d" and layer.groups != 1:
        return f"conv2d with groups={layer.groups} (im2col GEMM needs groups=1)"
    try:
        levels = code_levels(layer.code_set)
    except KernelError as err:
        return str(err)
    if len(levels) > MAX_LEVELS or np.abs(levels).max() > 127:
        return f"code set {layer.code_set} has {len(levels)} levels; a vpshufb table holds {MAX_LEVELS}"
    return first_missing(features, X86_VNNI_FEATURES)


# --------------------------------------------------------------------------------------------
# TensorIR
# --------------------------------------------------------------------------------------------


def prim_func(layer: IntLayer):
    """x_q int8 [M, K], W, lut, rowsum → acc int32 [M, N]. Needs :func:`schedule`: the table
    lookup is a 64-lane ``vpshufb`` that only exists once the decode loop is vectorized."""
    from tvm import te, tirx

    m, k, n = gemm_shape(layer)
    levels = code_levels(layer.code_set)
    bits = code_bits(levels)
    np_, kp = padded_sizes(n, k)
    no, kg = np_ // ROWS, kp // (GROUP * DEPTH)

    x = te.placeholder(layer.data_shape, "int8", name="x_q")
    w = te.placeholder((no, kg, bits, ROWS, DEPTH), "uint8", name="w_packed")
    lut = te.placeholder((LANES,), "int8", name="lut")
    rowsum = te.placeholder((n,), "int32", name="rowsum")
    element = im2col_element(layer, x) if layer.op == "conv2d" else (lambda i, j: x[i, j])

    mp = padded_rows(m)
    xu = te.compute(
        (mp, kp),
        lambda i, j: tirx.if_then_else(
            tirx.all(i < m, j < k),
            (element(tirx.min(i, m - 1), tirx.min(j, k - 1)).astype("int32") + 128).astype("uint8"),
            tirx.const(0, "uint8"),
        ),
        name="x_u8",
    )

    def decode(o, kb, ri, rk):
        code = unpack_code(lambda f: w[o, kb // GROUP, f, ri, rk], kb % GROUP, bits)
        return tirx.call_llvm_pure_intrin(
            "int8", "llvm.x86.avx512.pshuf.b.512", lut[ri * DEPTH + rk], code.astype("int8")
        )

    wdec = te.compute((no, kp // DEPTH, ROWS, DEPTH), decode, name="w_decoded")
    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (mp, np_),
        lambda i, j: te.sum(
            xu[i, r].astype("int32") * wdec[j // ROWS, r // DEPTH, j % ROWS, r % DEPTH].astype("int32"), axis=r
        ),
        name="acc",
    )
    if layer.op == "conv2d":
        b, _, oh, ow = conv_output_shape(layer)
        out = te.compute(
            (b, n, oh, ow), lambda bi, o, y, z: acc[(bi * oh + y) * ow + z, o] - 128 * rowsum[o], name="out"
        )
    else:
        out = te.compute((m, n), lambda i, j: acc[i, j] - 128 * rowsum[j], name="out")
    return te.create_prim_func([x, w, lut, rowsum, out])


def padded_rows(m: int) -> int:
    """GEMM rows padded to a multiple of M_ALIGN (batch 1 stays 1), so row tiles never need a
    predicate, which the tensorized loop cannot carry."""
    return m if m == 1 else -(-m // M_ALIGN) * M_ALIGN


def gemm_shape(layer: IntLayer) -> tuple[int, int, int]:
    """(M, K, N) of the layer as a GEMM: conv2d rows are output pixels, K is C·KH·KW."""
    if layer.op == "conv2d":
        b, o, oh, ow = conv_output_shape(layer)
        _, cg, kh, kw = layer.weight_shape
        return b * oh * ow, cg * kh * kw, o
    return layer.data_shape[0], layer.data_shape[1], layer.weight_shape[0]


def im2col_element(layer: IntLayer, x):
    """element(pixel, r) of the patch matrix, r = (c·KH + i)·KW + j; 0 in the padding."""
    from tvm import tirx

    _, _c, h, w = layer.data_shape
    _, _, kh, kw = layer.weight_shape
    _, _, oh, ow = conv_output_shape(layer)
    sh, sw = layer.strides
    dh, dw = layer.dilation
    pt, pl, _, _ = layer.padding

    def element(i, r):
        bi, pix = i // (oh * ow), i % (oh * ow)
        yy = pix // ow * sh + (r // kw) % kh * dh - pt
        zz = pix % ow * sw + r % kw * dw - pl
        inside = tirx.all(yy >= 0, yy < h, zz >= 0, zz < w)
        value = x[bi, r // (kh * kw), tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(zz, w - 1), 0)]
        return tirx.if_then_else(inside, value, tirx.const(0, "int8"))

    return element


@dataclass(frozen=True)
class LutVnniKnobs:
    """``row_blocks``: 16-row weight blocks computed side by side (independent vpdpbusd chains
    hide its latency); ``m_tile``: GEMM rows sharing one decoded block (batch > 1);
    ``m_block``: row tiles per parallel task (batch > 1; conv2d has many rows, few channels);
    ``k_chunk``: 32-element groups decoded at once (2 KiB each, reused by m_block·m_tile rows)."""

    row_blocks: int = 4
    m_tile: int = 4
    m_block: int = 16
    k_chunk: int = 8


def _divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def _gemm_blocks(layer: IntLayer) -> tuple[int, int, int]:
    """(padded GEMM rows, 16-row weight blocks, 32-element groups)."""
    m, k, n = gemm_shape(layer)
    np_, kp = padded_sizes(n, k)
    return padded_rows(m), np_ // ROWS, kp // (GROUP * DEPTH)


def default_knobs(layer: IntLayer) -> LutVnniKnobs:
    mp, blocks, groups = _gemm_blocks(layer)
    if mp == 1:
        return LutVnniKnobs(row_blocks=_divisor_at_most(blocks, 4), m_tile=1, m_block=1, k_chunk=1)
    m_tile = 4
    return LutVnniKnobs(
        row_blocks=_divisor_at_most(blocks, 2),
        m_tile=m_tile,
        m_block=_divisor_at_most(mp // m_tile, 16),
        k_chunk=_divisor_at_most(groups, 8),
    )


def _apply(sch, layer: IntLayer, knobs: LutVnniKnobs) -> None:
    """The schedule; knob fields are ints (defaults) or sampled variables (tuning)."""
    intrin = register_vnni_intrin()
    mp, _, _ = _gemm_blocks(layer)
    block = sch.get_sblock("acc")
    i, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, [None, ROWS])
    task, jb = sch.split(jo, [None, knobs.row_blocks])
    kgl, t, rk = sch.split(r, [None, GROUP, DEPTH])
    dec = sch.get_sblock("w_decoded")
    if mp == 1:
        sch.reorder(task, kgl, t, jb, i, ji, rk)
        sch.compute_at(dec, t)
        reduce_at, inner, par = kgl, jb, task
    else:
        mo, mi, ii = sch.split(i, [None, knobs.m_block, knobs.m_tile])
        kc, kgi = sch.split(kgl, [None, knobs.k_chunk])
        sch.reorder(mo, task, jb, kc, mi, kgi, t, ii, ji, rk)
        par = sch.fuse(mo, task)
        sch.compute_at(dec, kc)
        reduce_at, inner = kc, ii
    dec_loops = sch.get_loops(dec)
    sch.vectorize(sch.fuse(*dec_loops[-2:]))
    sch.unroll(dec_loops[-3])
    sch.parallel(par)
    out = sch.get_sblock("out")
    if layer.op == "dense":
        sch.reverse_compute_at(out, par)
    else:
        sch.parallel(sch.fuse(*sch.get_loops(out)[:2]))
    sch.decompose_reduction(block, reduce_at)
    sch.tensorize(ji, intrin)
    sch.unroll(inner)
    sch.unroll(t)
    xi, xj = sch.get_loops(sch.get_sblock("x_u8"))
    _, xv = sch.split(xj, [None, LANES])
    sch.vectorize(xv)
    if mp > 1:
        sch.parallel(xi)


def schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Parallel over 16-row weight blocks (and row blocks of the GEMM when batch > 1); stream
    the packed groups, decode each 16×4 block into a register (batch 1) or a reused tile, and
    vpdpbusd it."""
    _apply(sch, layer, default_knobs(layer))


def tuning_space(layer: IntLayer, features: frozenset[str]):
    """Samples the knobs of :class:`LutVnniKnobs` (only values that divide their loop: the
    tensorized loop must not carry a predicate)."""
    mp, blocks, groups = _gemm_blocks(layer)

    def choices(extent: int, options) -> list[int]:
        return [c for c in options if extent % c == 0] or [1]

    def sample(sch, options):
        return options[0] if len(options) == 1 else sch.sample_categorical(options, [1 / len(options)] * len(options))

    def space(sch) -> None:
        rows = sample(sch, choices(blocks, (1, 2, 4, 8)))
        if mp == 1:
            _apply(sch, layer, LutVnniKnobs(row_blocks=rows, m_tile=1, m_block=1, k_chunk=1))
            return
        m_tile = sample(sch, [1, 2, 4, 8])
        # m_block choices must divide mp / m_tile for every m_tile: divisors of mp / 8
        m_block = sample(sch, choices(mp // M_ALIGN, (1, 2, 4, 8, 16, 32)))
        chunk = sample(sch, choices(groups, (1, 2, 4, 8, 16, 32)))
        _apply(sch, layer, LutVnniKnobs(row_blocks=rows, m_tile=m_tile, m_block=m_block, k_chunk=chunk))

    return space


LUT_VNNI = register_kernel(
    IntKernel(
        name="lut",
        supports=supports,
        pack=pack,
        prim_func=prim_func,
        schedule=schedule,
        tuning_space=tuning_space,
        description="packed ≤4-bit codes decoded by vpshufb table lookup, int8 dot by vpdpbusd; dense and conv2d (x86 AVX-512 VNNI)",
    )
)

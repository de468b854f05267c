"""``int8-vnni-conv``: direct conv2d (groups = 1) on x86 with AVX-512 VNNI, in the blocked
layout of TVM's old x86 int8 ``conv2d_NCHWc``: any code set whose codes fit int8 (power-of-two
codes are int8 weights too).

Why direct and blocked: the im2col GEMM (``lut``) copies every input pixel KH·KW times and the
plain kernels (``int8``, ``reference-int``) multiply in 16/32-bit lanes; here each ``vpdpbusd``
does 16 output channels × 4 input channels (64 MACs) straight from the input, so a 3×3 conv
runs at int8 dot-product speed, four times the fp32 FMA rate per instruction.

Inside the one PrimFunc (calling convention of every conv2d kernel: ``x_q`` int8 NCHW, packed
weights, ``acc`` int32 NCHW):

1. ``data_u8``: the input packed to ``[N, C/4, H+pads, W+pads, 4]`` uint8 as ``x + 128``
   (``vpdpbusd`` multiplies unsigned by signed bytes); padding holds 128, i.e. x = 0, and
   channels beyond C hold 128 against zero weights.
2. ``acc_blocked``: ``[N, O/16, OH, OW, 16]`` int32; the micro-kernel keeps a tile of ``ow_tile``
   output columns × ``oc_blocks``·16 channels in zmm registers and, for each (C/4 block, kh,
   kw), loads ``oc_blocks`` 64-byte weight blocks and broadcasts 4 input bytes per column,
   one ``vpdpbusd`` per (column, block).
3. ``acc``: back to NCHW, minus the compensation ``128·Σ_{c,kh,kw} w[o]`` precomputed at pack
   time, which makes the result exact for every int8 input (the products are summed without
   saturation, so the identity holds modulo 2^32 like the reference's int32).

Fused (``fused_prim_func``, what the x86 lowering ships): stage 1 reads the layer's float
input and quantizes it on the way in (``quant_prims.quantize_value``), stage 3 applies the
epilogue, ``float32((acc + bias_q) [max 0]) · scale``, to each tile it writes back; the same
schedule and tuning space serve both forms (the stage names are the same).

Packed weights (``pack``): ``w_blocks`` int8 ``[O/16, C/4, KH, KW, 16, 4]`` (zero padded) and
``compensation`` int32 ``[O]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lastbit.codegen.kernels import FusedIO, IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    X86_VNNI_FEATURES,
    check_codes_shape,
    code_levels,
    conv_output_shape,
    first_missing,
    register_vnni_intrin,
)

NAME = "int8-vnni-conv"
OC_BLOCK = 16  # output channels per vpdpbusd (int32 lanes of a zmm register)
IC_BLOCK = 4  # input channels per vpdpbusd lane
ZERO_U8 = 128  # x = 0 in the shifted uint8 domain
MAX_OW_TILE = 28  # accumulator registers of one tile: 32 zmm minus weight and broadcast operands
DEFAULT_OW_TILE = 16  # wider default tiles spill: LLVM keeps broadcasts live across the kw unroll
MIN_ACCUMULATORS = 12  # independent vpdpbusd chains the default tile keeps in flight
MAX_OC_BLOCKS = 4  # 16-channel blocks per tile the tuner may try


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def pack_weight_blocks(codes: np.ndarray) -> np.ndarray:
    """OIHW int8 codes → ``[O/16, C/4, KH, KW, 16, 4]``, zero padded to whole blocks: one
    64-byte block is the signed operand of one ``vpdpbusd``."""
    o, c, kh, kw = codes.shape
    op, cp = _ceil_div(o, OC_BLOCK) * OC_BLOCK, _ceil_div(c, IC_BLOCK) * IC_BLOCK
    full = np.zeros((op, cp, kh, kw), np.int8)
    full[:o, :c] = codes
    blocks = full.reshape(op // OC_BLOCK, OC_BLOCK, cp // IC_BLOCK, IC_BLOCK, kh, kw)
    # [ob, oi, cb, ci, y, x] -> [ob, cb, y, x, oi, ci]
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 5, 1, 3))


def compensation(codes: np.ndarray) -> np.ndarray:
    """``128·Σ_{c,kh,kw} codes[o]`` per output channel (int32): what ``x + 128`` adds."""
    sums = np.asarray(codes, dtype=np.int64).reshape(codes.shape[0], -1).sum(axis=1)
    return (ZERO_U8 * sums).astype(np.int32)


def pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_codes_shape(layer, codes, NAME)
    if codes.size and (codes.min() < -128 or codes.max() > 127):
        raise KernelError(f"{NAME}: weight codes outside int8: [{codes.min()}, {codes.max()}]")
    codes = codes.astype(np.int8)
    return [pack_weight_blocks(codes), compensation(codes)]


# --------------------------------------------------------------------------------------------
# What it serves
# --------------------------------------------------------------------------------------------


def supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op != "conv2d":
        return f"serves conv2d only, not {layer.op}"
    if len(layer.data_shape) != 4:
        return f"conv2d input of rank {len(layer.data_shape)} (NCHW only)"
    if layer.groups != 1:
        return f"conv2d with groups={layer.groups} (dense convolutions only)"
    missing = first_missing(features, X86_VNNI_FEATURES)
    if missing:
        return missing
    try:
        conv_output_shape(layer)
        levels = code_levels(layer.code_set)
    except KernelError as err:
        return str(err)
    if levels.min() < -128 or levels.max() > 127:
        return f"code set {layer.code_set} does not fit int8"
    return None


# --------------------------------------------------------------------------------------------
# Compute (TE)
# --------------------------------------------------------------------------------------------


def _compute(layer: IntLayer, code, weights, channel_value, name: str):
    """The three stages over a layer input whose int8 code at (b, c, y, x) is ``code(...)``
    (an int32 expression); ``channel_value(acc, f)`` turns one exact accumulator of output
    channel ``f`` into the output element (stage 3's name is always ``acc``: the schedule
    addresses it)."""
    from tvm import te, tirx

    n, c, h, w = layer.data_shape
    o, _, kh, kw = layer.weight_shape
    _, _, oh, ow = conv_output_shape(layer)
    sh, sw = layer.strides
    dh, dw = layer.dilation
    pt, pl, pb, pr = layer.padding
    wt, comp = weights

    def shifted(b, q, y, z, ci):
        ch = q * IC_BLOCK + ci
        inside = tirx.all(y >= pt, y < pt + h, z >= pl, z < pl + w, ch < c)
        # indices clamped: a vectorized if_then_else may load both sides
        value = code(b, tirx.min(ch, c - 1), tirx.max(tirx.min(y - pt, h - 1), 0), tirx.max(tirx.min(z - pl, w - 1), 0))
        return tirx.if_then_else(inside, (value + ZERO_U8).astype("uint8"), tirx.const(ZERO_U8, "uint8"))

    data = te.compute((n, _ceil_div(c, IC_BLOCK), h + pt + pb, w + pl + pr, IC_BLOCK), shifted, name="data_u8")
    rc = te.reduce_axis((0, _ceil_div(c, IC_BLOCK)), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    ri = te.reduce_axis((0, IC_BLOCK), name="ri")
    acc_blocked = te.compute(
        (n, _ceil_div(o, OC_BLOCK), oh, ow, OC_BLOCK),
        lambda b, q, y, z, oi: te.sum(
            data[b, rc, y * sh + ry * dh, z * sw + rx * dw, ri].astype("int32")
            * wt[q, rc, ry, rx, oi, ri].astype("int32"),
            axis=[rc, ry, rx, ri],
        ),
        name="acc_blocked",
    )
    return te.compute(
        (n, o, oh, ow),
        lambda b, f, y, z: channel_value(acc_blocked[b, f // OC_BLOCK, y, z, f % OC_BLOCK] - comp[f], f),
        name=name,
    )


def _weights(layer: IntLayer):
    from tvm import te

    o, c, kh, kw = layer.weight_shape
    wt = te.placeholder((_ceil_div(o, OC_BLOCK), _ceil_div(c, IC_BLOCK), kh, kw, OC_BLOCK, IC_BLOCK), "int8",
                        name="w_blocks")
    return wt, te.placeholder((o,), "int32", name="compensation")


def prim_func(layer: IntLayer):
    from tvm import te

    x = te.placeholder(layer.data_shape, "int8", name="x_q")
    weights = _weights(layer)
    acc = _compute(layer, lambda *i: x[i].astype("int32"), weights, lambda acc, f: acc, "acc")
    return te.create_prim_func([x, *weights, acc])


def fused_prim_func(layer: IntLayer, io: FusedIO):
    """The layer whole: its float input quantized as the input is packed (each element once,
    ``quant_prims.quantize_value``), the epilogue applied as each tile of accumulators is
    written back (``quant_prims.epilogue_value``); no int8 or int32 tensor leaves the
    kernel. Arguments: x float32, inv float32 (), w_blocks, compensation, bias_q int32 [O],
    scale float32 [O] → float32 NCHW."""
    from tvm import te

    from lastbit.codegen.quant_prims import epilogue_value, quantize_value

    o = layer.weight_shape[0]
    x = te.placeholder(layer.data_shape, "float32", name="x")
    inv = te.placeholder((), "float32", name="inv")
    bias = te.placeholder((o,), "int32", name="bias_q")
    scale = te.placeholder((o,), "float32", name="scale")
    weights = _weights(layer)

    def code(*i):
        return quantize_value(x[i], inv(), io.act_lo, io.act_hi, relu=io.input_relu).astype("int32")

    out = _compute(layer, code, weights, lambda acc, f: epilogue_value(acc + bias[f], scale[f], io.output_relu),
                   "acc")
    return te.create_prim_func([x, inv, *weights, bias, scale, out])


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvVnniKnobs:
    """The micro-kernel's shape: ``ow_tile`` output columns × ``oc_blocks`` 16-channel blocks
    of accumulators in registers (each broadcast feeds ``oc_blocks`` vpdpbusd, each weight
    block ``ow_tile``); ``kw_unroll`` kernel-width taps unrolled inside the tile (a divisor of
    KW; the default unrolls all)."""

    ow_tile: int
    oc_blocks: int = 1
    kw_unroll: int = 1


def ow_tile_choices(layer: IntLayer) -> list[int]:
    """Output-column tiles that divide the row (no predicate in the micro-kernel) and fit the
    accumulator registers."""
    ow = conv_output_shape(layer)[3]
    return [t for t in range(1, min(ow, MAX_OW_TILE) + 1) if ow % t == 0]


def default_knobs(layer: IntLayer) -> ConvVnniKnobs:
    """The widest tile up to DEFAULT_OW_TILE columns that divides the row (ResNet rows 56, 28,
    14, 7 give 14, 14, 14, 7); short rows take more channel blocks so that at least
    MIN_ACCUMULATORS independent vpdpbusd chains hide the instruction's latency."""
    tile = max(t for t in ow_tile_choices(layer) if t <= DEFAULT_OW_TILE)
    blocks = _ceil_div(layer.weight_shape[0], OC_BLOCK)
    oc_blocks = 1
    while oc_blocks * tile < MIN_ACCUMULATORS and blocks % (2 * oc_blocks) == 0 and 2 * oc_blocks * tile <= MAX_OW_TILE:
        oc_blocks *= 2
    return ConvVnniKnobs(tile, oc_blocks, layer.weight_shape[3])


def _apply(sch, layer: IntLayer, ow_tile, oc_blocks, kw_unroll) -> None:
    """parallel(n, oc blocks, oh) / ow outer / (C/4, kh, kw outer) / kw inner, ow tile and oc
    blocks (unrolled) / 16×4 vpdpbusd.  Each knob is an int or a sampled variable; every
    factor must divide its loop (the tensorized block cannot carry a predicate)."""
    intrin = register_vnni_intrin("local")  # the register tile is a local buffer
    block = sch.get_sblock("acc_blocked")
    b, q, y, z, oi, rc, ry, rx, ri = sch.get_loops(block)
    qo, qi = sch.split(q, [None, oc_blocks])
    zo, zi = sch.split(z, [None, ow_tile])
    rxo, rxi = sch.split(rx, [None, kw_unroll])
    sch.reorder(b, qo, y, zo, rc, ry, rxo, rxi, zi, qi, oi, ri)
    # the tile's accumulators live in registers: a local buffer the unrolled loops promote
    sch.set_scope(block, 0, "local")
    out = sch.get_sblock("acc")
    row = sch.fuse(b, qo, y)
    sch.parallel(row)
    sch.reverse_compute_at(out, zo)
    sch.vectorize(sch.get_loops(out)[-1])
    for loop in (rxi, zi, qi):
        sch.unroll(loop)
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, intrin)
    # the input pack: parallel over (batch, channel block, padded row), one pixel's 4 bytes
    # written together
    pb, pc, py, _, pi = sch.get_loops(sch.get_sblock("data_u8"))
    sch.parallel(sch.fuse(pb, pc, py))
    sch.unroll(pi)


def schedule(sch, layer: IntLayer, features: frozenset[str], knobs: ConvVnniKnobs | None = None) -> None:
    """Default: :func:`default_knobs` (or the given ones)."""
    knobs = knobs or default_knobs(layer)
    _apply(sch, layer, knobs.ow_tile, knobs.oc_blocks, knobs.kw_unroll)


def tuning_space(layer: IntLayer, features: frozenset[str]):
    """The same knobs sampled with ``sample_perfect_tile`` (so every factor divides its loop and
    the trace replays under MetaSchedule's mutators): ow tile up to MAX_OW_TILE, up to
    MAX_OC_BLOCKS channel blocks, kernel-width unroll 1 … KW."""

    def space(sch) -> None:
        _, q, _, z, *_, rx, _ = sch.get_loops(sch.get_sblock("acc_blocked"))
        _, oc_blocks = sch.sample_perfect_tile(q, n=2, max_innermost_factor=MAX_OC_BLOCKS)
        _, ow_tile = sch.sample_perfect_tile(z, n=2, max_innermost_factor=MAX_OW_TILE)
        _, kw_unroll = sch.sample_perfect_tile(rx, n=2, max_innermost_factor=layer.weight_shape[3])
        _apply(sch, layer, ow_tile, oc_blocks, kw_unroll)

    return space


INT8_VNNI_CONV = register_kernel(
    IntKernel(
        name=NAME,
        supports=supports,
        pack=pack,
        prim_func=prim_func,
        schedule=schedule,
        tuning_space=tuning_space,
        description="int8 codes, direct conv2d in NCHW[c/4]c4 blocks, vpdpbusd 16×4 micro-kernel (x86 AVX-512 VNNI)",
        fused_prim_func=fused_prim_func,
    )
)

"""Direct int8 conv2d and dense kernels for ARM NEON, in a blocked layout, three flavours:

* ``int8-sdot`` — aarch64 with the dot-product extension (``+dotprod``: Cortex-A55/A76,
  Raspberry Pi 5): each ``sdot v.4s, w.16b, x.16b`` adds, to 4 output channels, the dot of 4
  input channels (16 int8 MACs); the input's 4 bytes are broadcast (``ld1r``) and reused by
  ``oc_blocks`` weight vectors, each weight vector by ``ow_tile`` columns. Products and sums
  are exact in int32 (signed × signed, no offset trick as x86's ``vpdpbusd`` needs).
* ``int8-smmla`` — aarch64 with the int8 matrix-multiply extension (``+i8mm``: armv8.6-a,
  Cortex-A710/X2, Neoverse V1/N2, Graviton 3): each ``smmla v.4s, x.16b, w.16b`` adds the 2×8 ·
  8×2 product of two output pixels' 8 input channels and two output channels' weights to a 2×2
  int32 tile (32 MACs, twice an sdot). Pixels come in pairs along the output row (an odd row
  computes one spare pixel, a dense layer one spare batch row) and the tile is de-interleaved
  into NCHW on the way out. The input is packed by stride phase (``[n, C/8, H+pads, SW,
  W'/SW, 8]``) so the two pixels' channels are always one contiguous 16-byte load.
* ``lut-sdot`` — the sdot kernel with its weights stored as code indices in 2-bit (≤ 4 levels)
  or 4-bit (≤ 16 levels: 3-bit codes) fields, 4 or 2 weight vectors of a tile per 16 bytes,
  decoded in the inner loop: per 16 weights a 16-byte load (shared by the vectors packed
  together), a shift, a mask and one ``tbl`` (index → int8 level, the table is data), then the
  same sdots — the ARM twin of x86's ``vpshufb`` + ``vpdpbusd``.
  It reads ¼ or ½ of int8's weight bytes (memory traffic, which qemu counts do not show) for
  more instructions per weight vector (which they do).
* ``int8-smlal`` (aarch64) / ``int8-smlal-v7`` (armv7) — NEON without dot product: int8 × int8
  multiply-accumulated into **int16** lanes (``smlal``/``smlal2``, armv7 ``vmlal.s8``: 8 MACs per instruction, twice an
  fp32 ``fmla``) over a block of the reduction short enough never to overflow, then widened
  into int32 once per block. With activations in [-128, 127] and codes of magnitude ≤ m, one
  product is at most 128·m, so a block of ``⌊32767 / (128·m)⌋`` products is safe: 63 for
  3-bit pow2-4 codes (m = 4), 2 for int8 codes (m = 127). A block is a whole number of input
  channels (all KH·KW taps of each); a layer whose KH·KW taps alone could overflow is
  declined (``reference-int`` serves it).

Both compute a conv2d as ``acc_blocked[n, o/OB, oh, ow, OB]`` (channels innermost, one vector
per output pixel; smmla: ``[n, o/2, oh, ow/2, 2, 2]``, one vector per pixel pair) from the
input packed to ``[n, C/IB, H+pads, W+pads, IB]`` int8 (IB = 4 for sdot, 8 for smmla, 1 for
smlal; zero padding, zero channels past C), then back to NCHW. A dense layer is
the same kernel on a 1×1 "image" of M columns (input channel = feature, column = row of the
batch), so one micro-kernel serves both.

Fused (``fused_prim_func``; sdot, lut-sdot and smlal conv2d, where :func:`fuses`): the pack
reads the layer's float input and quantizes it (``quant_prims.quantize_value``), sdot's 4
channel rows of up to 8 columns a tensor intrinsic whose shuffle LLVM stores with ``st4``
(smlal's one channel a contiguous vector row); ``acc_epilogue``
applies ``quant_prims.epilogue_value`` to the register tile's accumulator vectors before the
NCHW write-back. Same stage names, so one schedule and tuning space serve both forms.

Packed weights (``pack``): ``[O/(G·OB), C/IB, KH, KW, G, OB, IB]`` int8, zero padded (OB = 4 for
sdot, 2 for smmla, 16 for smlal; G = the register tile's channel blocks, :func:`default_knobs`), so one
tap's weights for a tile are one contiguous run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lastbit.codegen.kernels import FusedIO, IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    check_int8_codes,
    code_indices,
    code_levels,
    conv_output_shape,
    dot4_desc,
    first_missing,
)

SDOT_INTRIN = "lastbit_sdot_4x4_i8i32_neon"
SMMLA_INTRIN = "lastbit_smmla_2x8x2_i8i32_neon"
INT16_MAX = 32767
ACT_MAGNITUDE = 128  # |int8 activation| ≤ 128


@dataclass(frozen=True)
class Flavour:
    name: str
    oc_block: int  # output channels per accumulator vector group (packed weight block)
    ic_block: int  # input channels per dot-product lane
    needs: frozenset[str]
    register_budget: int  # vector registers the accumulator tile may take
    int16: bool = False  # int16 partial sums (smlal) rather than int32 (sdot)
    pixels: int = 1  # output pixels per accumulator vector (smmla: a pair)
    table_decode: bool = False  # weights as packed code indices, decoded by tbl in the loop

    @property
    def vector_round(self) -> bool:
        """Whether the fused quantize rounds with a vector instruction (armv7 NEON has none:
        quant_prims' clip-then-1.5·2²³ rounding)."""
        return "armv7" not in self.needs


# aarch64 has 32 vector registers, armv7 16 quad ones: the rest hold weights and broadcasts
SDOT = Flavour("int8-sdot", 4, 4, frozenset({"neon", "aarch64", "dotprod"}), register_budget=16)
SMMLA = Flavour("int8-smmla", 2, 8, frozenset({"neon", "aarch64", "i8mm"}), register_budget=16, pixels=2)
LUT_SDOT = Flavour("lut-sdot", 4, 4, frozenset({"neon", "aarch64", "dotprod"}), register_budget=16,
                  table_decode=True)
SMLAL = Flavour("int8-smlal", 16, 1, frozenset({"neon", "aarch64"}), register_budget=16, int16=True)
SMLAL_V7 = Flavour("int8-smlal-v7", 16, 1, frozenset({"neon", "armv7"}), register_budget=6, int16=True)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ConvGeometry:
    """A dense layer is a 1×1 conv over a 1×M image: every layer as conv2d numbers."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    oh: int
    ow: int
    strides: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)


def geometry(layer: IntLayer) -> ConvGeometry:
    if layer.op == "dense":
        m, k = layer.data_shape
        return ConvGeometry(1, k, 1, m, layer.weight_shape[0], 1, 1, 1, m)
    n, c, h, w = layer.data_shape
    o, _, kh, kw = layer.weight_shape
    _, _, oh, ow = conv_output_shape(layer)
    return ConvGeometry(n, c, h, w, o, kh, kw, oh, ow, tuple(layer.strides), tuple(layer.dilation),
                        tuple(layer.padding))


def max_code(code_set: str) -> int:
    return int(np.abs(code_levels(code_set).astype(np.int64)).max())


def int16_block_channels(layer: IntLayer) -> int:
    """Input channels per int16 partial sum: the most whose KH·KW·channels products, each at
    most 128·max|code|, stay within int16 (0: not even one channel's taps fit)."""
    g = geometry(layer)
    per_channel = g.kh * g.kw * ACT_MAGNITUDE * max(max_code(layer.code_set), 1)
    return INT16_MAX // per_channel


def smlal_chunk(layer: IntLayer) -> int:
    """The int16 block actually used: a divisor of C when one is at least half the bound (no
    padding), else the bound (C is zero-padded to a multiple of it)."""
    c = geometry(layer).c
    bound = min(int16_block_channels(layer), c)
    divisor = max(d for d in range(1, bound + 1) if c % d == 0)
    return divisor if 2 * divisor > bound else bound


def _padded_channels(flavour: Flavour, layer: IntLayer) -> int:
    c = geometry(layer).c
    step = smlal_chunk(layer) if flavour.int16 else flavour.ic_block
    return _ceil_div(c, step) * step


def executed_macs(flavour: Flavour, layer: IntLayer) -> int:
    """MACs the kernel actually issues: channels, output channels and (smmla) output columns
    rounded up to its blocks — an odd row or a batch-1 dense pays for a spare pixel. The cost
    table's rate is per executed MAC, so a shape that wastes half of each smmla costs twice."""
    g = geometry(layer)
    columns = _ceil_div(g.ow, flavour.pixels) * flavour.pixels
    out_channels = _ceil_div(g.o, flavour.oc_block) * flavour.oc_block
    return g.n * g.oh * columns * out_channels * _padded_channels(flavour, layer) * g.kh * g.kw


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def pack_weight_blocks(codes: np.ndarray, oc_block: int, ic_block: int, channels: int, group: int = 1) -> np.ndarray:
    """OIHW int8 codes → ``[O/(G·OB), C/IB, KH, KW, G, OB, IB]`` with C zero padded to
    ``channels``: the G blocks of one register tile side by side, so one tap's weights are
    one contiguous run (loads with immediate offsets, ``ldp``)."""
    o, c, kh, kw = codes.shape
    op = _ceil_div(o, oc_block * group) * oc_block * group
    full = np.zeros((op, channels, kh, kw), np.int8)
    full[:o, :c] = codes
    blocks = full.reshape(op // (oc_block * group), group, oc_block, channels // ic_block, ic_block, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 3, 5, 6, 1, 2, 4))


def pack(flavour: Flavour, layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_int8_codes(layer, codes, flavour.name)
    if flavour.int16 and codes.size and np.abs(codes.astype(np.int64)).max() > max_code(layer.code_set):
        raise KernelError(f"{flavour.name}: codes exceed the code set {layer.code_set} (int16 block bound)")
    if layer.op == "dense":
        codes = codes[:, :, None, None]
    group = default_knobs(flavour, layer).oc_blocks
    if flavour.table_decode:
        levels = code_levels(layer.code_set)
        codes = code_indices(codes, levels, f"{flavour.name} {layer.op} {layer.weight_shape}").astype(np.int8)
        blocks = pack_weight_blocks(codes, flavour.oc_block, flavour.ic_block, _padded_channels(flavour, layer), group)
        table = np.zeros(16, np.int8)
        table[: len(levels)] = levels
        return [pack_index_fields(blocks, index_bits(layer)), table]
    return [pack_weight_blocks(codes, flavour.oc_block, flavour.ic_block, _padded_channels(flavour, layer), group)]


def index_bits(layer: IntLayer) -> int:
    """Bits of one packed code index: 2 for ≤ 4 levels, else 4 (a byte splits evenly)."""
    return 2 if len(code_levels(layer.code_set)) <= 4 else 4


def pack_index_fields(blocks: np.ndarray, bits: int) -> np.ndarray:
    """``[.., G, OB, IB]`` indices (one weight vector of 16 per channel block of the tile) →
    ``[.., ⌈G/P⌉, 16]`` uint8, P = 8/bits: byte l of a row holds lane l of P weight vectors
    (vector g at bit ``bits·(g % P)``), so decoding a vector is a 16-byte load, a shift, a
    mask and a tbl. A tile of fewer than P blocks leaves the high fields empty."""
    per_byte = 8 // bits
    *outer, group, ob, ib = blocks.shape
    lanes = np.zeros((*outer, -(-group // per_byte) * per_byte, ob * ib), np.uint8)
    lanes[..., :group, :] = blocks.reshape(*outer, group, ob * ib)
    fields = lanes.reshape(*outer, -1, per_byte, ob * ib)
    shifts = (bits * np.arange(per_byte, dtype=np.uint8))[:, None]
    return np.bitwise_or.reduce(fields << shifts, axis=-2).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# What it serves
# --------------------------------------------------------------------------------------------


def supports(flavour: Flavour, layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    if layer.op == "dense" and len(layer.data_shape) != 2:
        return f"dense input of rank {len(layer.data_shape)} (2-D only)"
    if layer.op == "conv2d" and (len(layer.data_shape) != 4 or layer.groups != 1):
        return f"conv2d with groups={layer.groups} (dense convolutions only)"
    missing = first_missing(features, flavour.needs)
    if missing:
        return missing
    try:
        geometry(layer)
        mag = max_code(layer.code_set)
    except KernelError as err:
        return str(err)
    if mag > 127:
        return f"code set {layer.code_set} does not fit int8"
    if flavour.table_decode and len(code_levels(layer.code_set)) > 16:
        return f"code set {layer.code_set} has {len(code_levels(layer.code_set))} levels; the tbl table holds 16"
    if flavour.int16 and int16_block_channels(layer) < 1:
        g = geometry(layer)
        return (f"{g.kh}x{g.kw} taps of {layer.code_set} codes (|code| ≤ {mag}) can overflow an int16 "
                f"partial sum")
    return None


# --------------------------------------------------------------------------------------------
# The sdot tensor intrinsic: C[4] += Σ_k A[k]·B[i, k], k < 4
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def register_sdot_intrin() -> str:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    desc = dot4_desc("int8", 4, "local")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot"),
                C.vload([0], dtype="int32x4"),
                B.vload([0, 0], dtype="int8x16"),
                T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(SDOT_INTRIN, desc, impl, override=True)
    return SDOT_INTRIN


# --------------------------------------------------------------------------------------------
# The smmla tensor intrinsic: C[i, j] += Σ_k A[i, k]·B[j, k], i, j < 2, k < 8
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def register_smmla_intrin() -> str:
    """One ``smmla``: A = two pixels' 8 input channels (16 contiguous bytes), B = two output
    channels' 8 weights, C = the 2×2 int32 tile (pixel-major: lane = 2·pixel + channel)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for i, j, k in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            C[0, T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla"),
                C.vload([0, 0], dtype="int32x4"),
                A.vload([0, 0], dtype="int8x16"),
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(SMMLA_INTRIN, desc, impl, override=True)
    return SMMLA_INTRIN


# --------------------------------------------------------------------------------------------
# The fused input pack: 4 channels' float rows quantized and interleaved, O[z, c] = q(A[c, z])
# --------------------------------------------------------------------------------------------

PACK_COLUMNS = 8  # columns per quantize-and-interleave: 4 × 8 int8 codes, one st4
SMLAL_FUSED_MIN_CHANNELS = 32  # smlal layers with fewer input channels counted more fused


@functools.lru_cache(maxsize=None)
def register_quantize_pack_intrin(columns: int, lo: int, hi: int, relu: bool) -> str:
    """``columns`` output columns of the sdot input pack from float input: 4 channel rows of
    ``columns`` floats (A, any row strides) quantized by ``quant_prims.quantize_value`` and
    stored interleaved, ``O[z, c]`` (the packed ``[.., W, 4]`` run). The description is that
    expression per element; the implementation computes it on 4 vectors and interleaves them
    with one shuffle, which LLVM stores with ``st4`` (TVM's own vectorizer stores a strided
    vector a lane at a time). Vector rounding only (not armv7)."""
    from tvm import tirx
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    from lastbit.codegen.quant_prims import quantize_value

    name = f"lastbit_neon_quantize_pack_{columns}x4_{lo}_{hi}{'_relu' if relu else ''}"

    def element(a, inv):
        return quantize_value(a, inv, lo, hi, relu=relu)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, f: T.handle, o: T.handle) -> None:
        A = T.match_buffer(a, (4, 1, columns), "float32", offset_factor=1, strides=[T.int32(), T.int32(), 1])
        inv = T.match_buffer(f, (), "float32", offset_factor=1)
        O = T.match_buffer(o, (columns, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:4, 0, 0:columns], inv[()])
            T.writes(O[0:columns, 0:4])
            for z, c in T.grid(columns, 4):
                with T.sblock("pack"):
                    vz, vc = T.axis.remap("SS", [z, c])
                    O[vz, vc] = element(A[vc, 0, vz], inv[()])

    def vector(value: float):
        return tirx.Broadcast(tirx.const(value, "float32"), columns)

    def quantized(row, inv):  # quantize_value on a vector of one channel's columns
        if relu:
            row = tirx.Max(row, vector(0.0))
        scaled = tirx.nearbyint(row * tirx.Broadcast(inv, columns))
        return tirx.Cast(f"int8x{columns}", tirx.Min(tirx.Max(scaled, vector(float(lo))), vector(float(hi))))

    def interleaved(rows, inv):
        return tirx.Shuffle([quantized(row, inv) for row in rows],
                            [c * columns + z for z in range(columns) for c in range(4)])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, f: T.handle, o: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        A = T.match_buffer(a, (4, 1, columns), "float32", offset_factor=1, strides=[s0, s1, 1])
        inv = T.match_buffer(f, (), "float32", offset_factor=1)
        O = T.match_buffer(o, (columns, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:4, 0, 0:columns], inv[()])
            T.writes(O[0:columns, 0:4])
            O[0, T.ramp(T.int32(0), 1, 4 * columns)] = interleaved(
                [A.vload([0, 0, 0], f"float32x{columns}"), A.vload([1, 0, 0], f"float32x{columns}"),
                 A.vload([2, 0, 0], f"float32x{columns}"), A.vload([3, 0, 0], f"float32x{columns}")], inv[()])

    TensorIntrin.register(name, desc, impl, override=True)
    return name


# --------------------------------------------------------------------------------------------
# Compute (TE)
# --------------------------------------------------------------------------------------------


def prim_func(flavour: Flavour, layer: IntLayer):
    return _layer_func(flavour, layer, None)


def fused_prim_func(flavour: Flavour, layer: IntLayer, io: FusedIO):
    """The conv2d layer whole: its float input quantized as the input is packed (each element
    once, ``quant_prims.quantize_value``; armv7 with the clip-then-1.5·2²³ rounding), the
    epilogue (``quant_prims.epilogue_value``) applied as each register tile of accumulators is
    written back; no int8 or int32 tensor leaves the kernel. Arguments: x float32, inv
    float32 (), *packed weights, bias_q int32 [O], scale float32 [O] → float32 NCHW."""
    from lastbit.codegen.quant_lowering import FUSED_IO_ATTR, fused_io_to_json

    if layer.op != "conv2d":
        raise KernelError(f"{flavour.name}: the fused form serves conv2d, not {layer.op}")
    # the schedule reads it back: the pack's tensor intrinsic is the quantize's expression
    return _layer_func(flavour, layer, io).with_attr(FUSED_IO_ATTR, fused_io_to_json(io))


def _offers_fused(flavour: Flavour) -> bool:
    """The flavours whose fused form arm_insn_count counted fewer instructions than three
    functions for: sdot and smlal (4 or 1 channels a pixel), with a vector rint. Not smmla
    (its stride-phase pack has no vector quantize; a trial with an 8-channel one added more
    to the kernel than the separate loops cost), not armv7 (scalar rounding: the ResNet-20
    conv 555k vs 522k)."""
    return flavour.ic_block in (1, 4) and flavour.pixels == 1 and flavour.vector_round


def pack_columns(layer: IntLayer) -> int:
    """Output columns per quantize-and-interleave of the fused pack: the most of 8, 4, 2 that
    divide the row (1: an odd row, which the fused form does not serve)."""
    width = geometry(layer).w
    return max(d for d in (1, 2, 4, PACK_COLUMNS) if width % d == 0)


def fuses(flavour: Flavour, layer: IntLayer) -> bool:
    """Whether the fused form serves ``layer``: conv2d whose channels fill the pack's 4-channel
    blocks and whose rows split into vector runs (an odd row — ResNet-18's 7×7 — or C = 3
    would pack a pixel at a time, more instructions than the separate vector quantize).
    smlal also needs stride 1 and at least SMLAL_FUSED_MIN_CHANNELS input channels: so
    gated, whole ResNet-20 on plain aarch64 counted fewer instructions fused (8.60M; every
    layer fused 8.73M, none 8.72M)."""
    g = geometry(layer)
    if flavour.ic_block == 1 and (g.c < SMLAL_FUSED_MIN_CHANNELS or g.strides != (1, 1)):
        return False
    return layer.op == "conv2d" and g.c % flavour.ic_block == 0 and pack_columns(layer) > 1


def _fused_io(sch) -> FusedIO | None:
    """The FusedIO of a schedule's fused PrimFunc (None: the kernel alone)."""
    from lastbit.codegen.quant_lowering import FUSED_IO_ATTR, fused_io_from_json

    attrs = sch.mod["main"].attrs
    return fused_io_from_json(str(attrs[FUSED_IO_ATTR])) if attrs is not None and FUSED_IO_ATTR in attrs else None


def _layer_func(flavour: Flavour, layer: IntLayer, io: FusedIO | None):
    """The kernel's PrimFunc: int8 codes in, int32 accumulators out; with ``io``, float in and
    out (the layer's quantize and epilogue inside). The stage names are the same either way,
    so one schedule and tuning space serve both."""
    from tvm import te, tirx

    from lastbit.codegen.quant_prims import quantize_value

    g = geometry(layer)
    ib, ob = flavour.ic_block, flavour.oc_block
    cp = _padded_channels(flavour, layer)
    cb, obs = cp // ib, _ceil_div(g.o, ob)
    group = default_knobs(flavour, layer).oc_blocks  # blocks per register tile, as packed
    pt, pl, pb, pr = g.padding
    sh, sw = g.strides
    dh, dw = g.dilation
    if io is None:
        x = te.placeholder(layer.data_shape, "int8", name="x_q")
        inputs = [x]

        def code(*i):
            return x[i]
    else:
        x = te.placeholder(layer.data_shape, "float32", name="x")
        inv = te.placeholder((), "float32", name="inv")
        inputs = [x, inv]

        def code(*i):
            return quantize_value(x[i], inv(), io.act_lo, io.act_hi, flavour.vector_round, io.input_relu)
    weight_shape = (obs // group, cb, g.kh, g.kw, group, ob, ib)
    if flavour.table_decode:
        bits = index_bits(layer)
        per_byte = 8 // bits
        fields = te.placeholder((*weight_shape[:4], _ceil_div(group, per_byte), ob * ib), "uint8", name="w_fields")
        table = te.placeholder((16,), "int8", name="levels")

        def decode(a, c, y, z, gi, oi, ri):
            lane = oi * ib + ri
            field = fields[a, c, y, z, gi // per_byte, lane] >> (bits * (gi % per_byte)).astype("uint8")
            index = (field & tirx.const((1 << bits) - 1, "uint8")).astype("int8")
            return tirx.call_llvm_pure_intrin("int8", "llvm.aarch64.neon.tbl1", table[lane], index)

        wt = te.compute(weight_shape, decode, name="w_decoded")
        params = [*inputs, fields, table]
    else:
        wt = te.placeholder(weight_shape, "int8", name="w_blocks")
        params = [*inputs, wt]
    epilogue = None  # (bias_q, scale, FusedIO) of the fused form
    if io is not None:
        bias = te.placeholder((g.o,), "int32", name="bias_q")
        scale = te.placeholder((g.o,), "float32", name="scale")
        params += [bias, scale]
        epilogue = (bias, scale, io)

    def source(b, ch, y, z):  # x[b, ch, y, z] of the conv view; indices clamped (vector loads)
        ch = tirx.min(ch, g.c - 1)
        if layer.op == "dense":
            return code(tirx.max(tirx.min(z, g.w - 1), 0), ch)
        return code(b, ch, tirx.max(tirx.min(y, g.h - 1), 0), tirx.max(tirx.min(z, g.w - 1), 0))

    def packed(b, q, y, z, ci):
        ch = q * ib + ci
        # nothing to zero or clamp (so the fused pack's intrinsic matches); smmla's phases
        # read columns past the row, which the condition zeroes
        if not any(g.padding) and cp == g.c and flavour.pixels == 1:
            return code(b, ch, y, z) if layer.op == "conv2d" else code(z, ch)
        inside = tirx.all(y >= pt, y < pt + g.h, z >= pl, z < pl + g.w, ch < g.c)
        return tirx.if_then_else(inside, source(b, ch, y - pt, z - pl), tirx.const(0, "int8"))

    ry = te.reduce_axis((0, g.kh), name="ry")
    rx = te.reduce_axis((0, g.kw), name="rx")
    if flavour.pixels == 2:
        acc_blocked = _smmla_compute(g, flavour, packed, wt, group, cb, ry, rx)
        return te.create_prim_func([*params, _written_back(layer, g, acc_blocked, flavour, epilogue)])
    data = te.compute((g.n, cb, g.h + pt + pb, g.w + pl + pr, ib), packed, name="data_pack")
    if not flavour.int16:
        rc = te.reduce_axis((0, cb), name="rc")
        ri = te.reduce_axis((0, ib), name="ri")
        acc_blocked = te.compute(
            (g.n, obs, g.oh, g.ow, ob),
            lambda b, q, y, z, oi: te.sum(
                data[b, rc, y * sh + ry * dh, z * sw + rx * dw, ri].astype("int32")
                * wt[q // group, rc, ry, rx, q % group, oi, ri].astype("int32"),
                axis=[rc, ry, rx, ri],
            ),
            name="acc_blocked",
        )
    else:
        chunk = smlal_chunk(layer)
        rc = te.reduce_axis((0, chunk), name="rc")
        partial = te.compute(
            (g.n, obs, g.oh, g.ow, cp // chunk, ob),
            lambda b, q, y, z, k, oi: te.sum(
                data[b, k * chunk + rc, y * sh + ry * dh, z * sw + rx * dw, 0].astype("int16")
                * wt[q // group, k * chunk + rc, ry, rx, q % group, oi, 0].astype("int16"),
                axis=[rc, ry, rx],
            ),
            name="partial",
        )
        rk = te.reduce_axis((0, cp // chunk), name="rk")
        acc_blocked = te.compute(
            (g.n, obs, g.oh, g.ow, ob),
            lambda b, q, y, z, oi: te.sum(partial[b, q, y, z, rk, oi].astype("int32"), axis=rk),
            name="acc_blocked",
        )
    return te.create_prim_func([*params, _written_back(layer, g, acc_blocked, flavour, epilogue)])


def _smmla_compute(g: ConvGeometry, flavour: Flavour, packed, wt, group: int, cb: int, ry, rx):
    """``[n, O/2, oh, ow/2, 2 pixels, 2 channels]`` from the input packed by stride phase:
    column ``q·SW + phase`` lives at ``[.., phase, q, :]``, so output columns 2·zp and 2·zp + 1
    read adjacent 8-channel groups at every tap, whatever the stride (one 16-byte load)."""
    from tvm import te

    pt, _, pb, _ = g.padding
    sh, sw = g.strides
    dh, dw = g.dilation
    ib, obs = flavour.ic_block, _ceil_div(g.o, flavour.oc_block)
    pairs = _ceil_div(g.ow, 2)
    # the last pair's second column at the last tap; columns past the padded input read zeros
    phase_width = 2 * pairs + (g.kw - 1) * dw // sw
    data = te.compute(
        (g.n, cb, g.h + pt + pb, sw, phase_width, ib),
        lambda b, q, y, phase, col, ci: packed(b, q, y, col * sw + phase, ci),
        name="data_pack",
    )
    rc = te.reduce_axis((0, cb), name="rc")
    ri = te.reduce_axis((0, ib), name="ri")
    return te.compute(
        (g.n, obs, g.oh, pairs, 2, flavour.oc_block),
        lambda b, q, y, zp, p, oi: te.sum(
            data[b, rc, y * sh + ry * dh, (rx * dw) % sw, zp * 2 + p + (rx * dw) // sw, ri].astype("int32")
            * wt[q // group, rc, ry, rx, q % group, oi, ri].astype("int32"),
            axis=[rc, ry, rx, ri],
        ),
        name="acc_blocked",
    )


def _written_back(layer: IntLayer, g: ConvGeometry, acc_blocked, flavour: Flavour, epilogue):
    """The blocked accumulators back to the layer's layout (NCHW, or rows × features). Fused
    (``epilogue`` = (bias_q, scale, FusedIO)): first ``acc_epilogue``, the float epilogue in
    the blocked layout, so it runs on whole accumulator vectors (channels innermost, bias and
    scale loaded as vectors), then the layout change on floats."""
    from tvm import te, tirx

    from lastbit.codegen.quant_prims import epilogue_value

    ob = flavour.oc_block
    if epilogue is not None:
        bias, scale, io = epilogue
        accumulators = acc_blocked

        def value(*i):
            f = i[1] * ob + i[-1]
            if g.o % ob:  # channels past O (block padding, never stored): any bias in range
                f = tirx.min(f, g.o - 1)
            return epilogue_value(accumulators[i] + bias[f], scale[f], io.output_relu)

        acc_blocked = te.compute(accumulators.shape, value, name="acc_epilogue")

    def at(b, f, y, z):
        if flavour.pixels == 2:  # de-interleave the 2×2 pixel × channel tiles
            return acc_blocked[b, f // ob, y, z // 2, z % 2, f % ob]
        return acc_blocked[b, f // ob, y, z, f % ob]

    if layer.op == "dense":
        return te.compute((g.w, g.o), lambda i, j: at(0, j, 0, i), name="acc")
    return te.compute((g.n, g.o, g.oh, g.ow), at, name="acc")


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeonKnobs:
    """Register tile: ``ow_tile`` output columns (smmla: column pairs) × ``oc_blocks`` weight
    blocks of accumulators."""

    ow_tile: int
    oc_blocks: int


def default_knobs(flavour: Flavour, layer: IntLayer, features: frozenset[str] = frozenset()) -> NeonKnobs:
    """The tile with the most MACs per instruction of the inner loop (per tap: one weight load
    per block, one broadcast per column, one sdot / two smlal per block and column) whose
    accumulators fit the register budget; both factors divide their loops."""
    g = geometry(layer)
    obs = _ceil_div(g.o, flavour.oc_block)
    regs_per_acc = 1 if not flavour.int16 else 2  # 16 int16 lanes are two q registers
    macs = flavour.oc_block * flavour.ic_block * flavour.pixels
    columns = _ceil_div(g.ow, flavour.pixels)  # accumulator vectors along the row (smmla: pairs)
    budget = flavour.register_budget
    best, best_rate = NeonKnobs(1, 1), 0.0
    for blocks in (d for d in range(1, min(obs, 8) + 1) if obs % d == 0):
        for tile in (d for d in range(1, columns + 1) if columns % d == 0):
            if regs_per_acc * blocks * tile > budget:
                continue
            rate = macs * blocks * tile / (blocks + tile + regs_per_acc * blocks * tile)
            if rate > best_rate:
                best, best_rate = NeonKnobs(tile, blocks), rate
    return best


def _apply(flavour: Flavour, sch, layer: IntLayer, ow_tile, oc_blocks, unroll_taps=1) -> None:
    """The register tile (``ow_tile`` columns × ``oc_blocks`` channel blocks: ints or sampled
    variables) and whether the kernel-width taps are unrolled into the tile's body."""
    block = sch.get_sblock("acc_blocked")
    if flavour.pixels == 2:
        b, q, y, z, p, oi, rc, ry, rx, ri = sch.get_loops(block)
        qo, qi = sch.split(q, [None, oc_blocks])
        zo, zi = sch.split(z, [None, ow_tile])
        sch.reorder(b, qo, y, zo, rc, ry, rx, zi, qi, p, oi, ri)
        sch.set_scope(block, 0, "local")  # the tile lives in registers
        sch.parallel(sch.fuse(b, qo, y))
        _write_back_at(sch, zo)
        for loop in (rx, zi, qi):
            sch.unroll(loop)
        init = sch.decompose_reduction(block, rc)
        sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
        sch.tensorize(p, register_smmla_intrin())
        _schedule_pack(sch, layer, flavour)
        return
    if not flavour.int16:
        b, q, y, z, oi, rc, ry, rx, ri = sch.get_loops(block)
        qo, qi = sch.split(q, [None, oc_blocks])
        zo, zi = sch.split(z, [None, ow_tile])
        sch.reorder(b, qo, y, zo, rc, ry, rx, zi, qi, oi, ri)
        sch.set_scope(block, 0, "local")  # the tile lives in registers
        sch.parallel(sch.fuse(b, qo, y))
        _write_back_at(sch, zo)
        for loop in ((rx,) if _value(sch, unroll_taps) else ()) + (zi, qi):
            sch.unroll(loop)
        init = sch.decompose_reduction(block, rc)
        sch.vectorize(sch.get_loops(init)[-1])
        if flavour.table_decode:  # decode the tile's weight vectors of this tap, 16 lanes a tbl
            decoded = sch.get_sblock("w_decoded")
            sch.compute_at(decoded, rx)
            *_, gi, oi_d, ri_d = sch.get_loops(decoded)
            sch.vectorize(sch.fuse(oi_d, ri_d))
            sch.unroll(gi)
        sch.tensorize(oi, register_sdot_intrin())
    else:
        b, q, y, z, oi, rk = sch.get_loops(block)
        qo, qi = sch.split(q, [None, oc_blocks])
        zo, zi = sch.split(z, [None, ow_tile])
        sch.reorder(b, qo, y, zo, rk, zi, qi, oi)
        sch.parallel(sch.fuse(b, qo, y))
        part = sch.get_sblock("partial")
        sch.compute_at(part, rk)
        sch.set_scope(part, 0, "local")  # int16 partial sums in registers
        # compute_at leaves out unit loops: name the ones it made from the known extents
        g = geometry(layer)
        extents = {"z": ow_tile, "q": oc_blocks, "oi": flavour.oc_block, "rc": smlal_chunk(layer),
                   "ry": g.kh, "rx": g.kw}
        loops = sch.get_loops(part)
        at = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(rk)))
        inner = loops[at + 1:]
        named = dict(zip([k for k, v in extents.items() if _value(sch, v) > 1], inner))
        reductions = [named[k] for k in ("rc", "ry", "rx") if k in named]
        spatial = [named[k] for k in ("z", "q", "oi") if k in named]
        sch.reorder(*reductions, *spatial)
        for key in ("rx", "z", "q") if _value(sch, unroll_taps) else ("z", "q"):
            if key in named:
                sch.unroll(named[key])
        sch.vectorize(named["oi"])
        pinit = sch.decompose_reduction(part, (reductions or spatial)[0])
        sch.vectorize(sch.get_loops(pinit)[-1])
        sch.unroll(zi)
        sch.unroll(qi)
        sch.vectorize(oi)
        init = sch.decompose_reduction(block, rk)
        sch.vectorize(sch.get_loops(init)[-1])
        _write_back_at(sch, zo)
    _schedule_pack(sch, layer, flavour)


def _write_back_at(sch, loop) -> None:
    """The tile's write-back into ``loop`` (the register tile's outer column loop); fused, the
    epilogue first, a vector of accumulators at a time, then the columns of each channel
    stored as one vector."""
    out = sch.get_sblock("acc")
    if _fused_io(sch) is None:
        sch.reverse_compute_at(out, loop)
        return
    epilogue = sch.get_sblock("acc_epilogue")
    for block in (epilogue, out):  # unrolled: the tile stays in registers (constant indices)
        sch.reverse_compute_at(block, loop)
        loops = sch.get_loops(block)
        at = next(i for i, outer in enumerate(loops) if sch.get(outer).same_as(sch.get(loop)))
        *tile, lanes = loops[at + 1:]
        for tile_loop in tile:
            sch.unroll(tile_loop)
        sch.vectorize(lanes)
    sch.set_scope(epilogue, 0, "local")


def _schedule_pack(sch, layer: IntLayer, flavour: Flavour) -> None:
    """The input pack: parallel over (batch, channel block, padded row), each pixel's channel
    block unrolled. Fused (the pack quantizes float input): the zero border written first and
    the interior, free of bounds tests, a run of columns at a time, the 4 channels quantized
    as vectors and interleaved as they are stored (:func:`register_quantize_pack_intrin`: one
    ``st4`` per 8 columns; smlal: a contiguous vector row); a layer :func:`fuses` declines
    packs a pixel at a time."""
    block = sch.get_sblock("data_pack")
    io = _fused_io(sch)
    if io is not None and fuses(flavour, layer):
        if any(geometry(layer).padding):
            pad = sch.decompose_padding(block, sch.get_loops(block)[0])
            sch.vectorize(sch.fuse(*sch.get_loops(pad)[-2:]))
        pb, pc, py, z, _ = sch.get_loops(block)
        sch.parallel(sch.fuse(pb, pc, py))
        if flavour.ic_block == 1:  # smlal: one channel a pixel, the packed row is contiguous
            sch.vectorize(z)
            return
        inner = sch.split(z, [None, pack_columns(layer)])[1]
        sch.tensorize(inner, register_quantize_pack_intrin(pack_columns(layer), io.act_lo, io.act_hi, io.input_relu))
        return
    pb, pc, py, *_, pi = sch.get_loops(block)
    sch.parallel(sch.fuse(pb, pc, py))
    sch.unroll(pi)


def _value(sch, knob) -> int:
    """A knob's value: an int, or a sampled variable's current draw."""
    return knob if isinstance(knob, int) else int(sch.get(knob))


def schedule(flavour: Flavour, sch, layer: IntLayer, features: frozenset[str], knobs: NeonKnobs | None = None) -> None:
    """Default: :func:`default_knobs` (or the given ones)."""
    knobs = knobs or default_knobs(flavour, layer, features)
    _apply(flavour, sch, layer, knobs.ow_tile, knobs.oc_blocks)


def tuning_space(flavour: Flavour, layer: IntLayer, features: frozenset[str]):
    """The register tile's output columns and channel blocks, each a divisor of its loop
    (``sample_perfect_tile``, up to 8), and whether the kernel-width taps are unrolled.

    The packed weight layout groups :func:`default_knobs`' channel blocks; another block
    count reads them at another stride, which changes speed, never the result (the compute
    indexes the packed tensor, the schedule only splits its loops).  No thread-split knob:
    the ARM targets declare one core (``num-cores``) and are measured single-threaded."""

    def space(sch) -> None:
        loops = sch.get_loops(sch.get_sblock("acc_blocked"))
        _, oc_blocks = sch.sample_perfect_tile(loops[1], n=2, max_innermost_factor=8)
        _, ow_tile = sch.sample_perfect_tile(loops[3], n=2, max_innermost_factor=8)
        unroll_taps = sch.sample_categorical([0, 1], [0.5, 0.5])
        _apply(flavour, sch, layer, ow_tile, oc_blocks, unroll_taps)

    return space


def _kernel(flavour: Flavour, description: str) -> IntKernel:
    fused = functools.partial(fused_prim_func, flavour) if _offers_fused(flavour) else None
    return register_kernel(
        IntKernel(
            name=flavour.name,
            supports=functools.partial(supports, flavour),
            pack=functools.partial(pack, flavour),
            prim_func=functools.partial(prim_func, flavour),
            fused_prim_func=fused,
            fuses=functools.partial(fuses, flavour) if fused else None,
            schedule=functools.partial(schedule, flavour),
            tuning_space=functools.partial(tuning_space, flavour),
            description=description,
        )
    )


INT8_SDOT = _kernel(SDOT, "int8 codes, direct conv2d/dense in [c/4]c4 blocks, sdot micro-kernel (aarch64 +dotprod)")
INT8_SMMLA = _kernel(SMMLA, "int8 codes, direct conv2d/dense in [c/8]c8 blocks over pixel pairs, smmla micro-kernel "
                              "(aarch64 +i8mm)")
LUT_SDOT_KERNEL = _kernel(LUT_SDOT, "≤ 16-level codes as 2/4-bit indices decoded by tbl, sdot micro-kernel "
                                   "(aarch64 +dotprod)")
INT8_SMLAL = _kernel(SMLAL, "int8 codes, direct conv2d/dense, smlal into overflow-free int16 blocks (aarch64 NEON)")
INT8_SMLAL_V7 = _kernel(SMLAL_V7, "int8 codes, direct conv2d/dense, vmlal.s8 into overflow-free int16 blocks (armv7)")

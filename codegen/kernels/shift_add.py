"""``shift-add``: dense and conv2d for power-of-two weight codes without a multiplier.

Each weight is stored as sign + exponent: ``e = 0`` for a zero code, else ``log2|q| + 1``, so
``x·q = ±(x << (e − 1))``. The activation (int8, widened to int32) is shifted, conditionally
negated (``(v ^ −s) + s``) and added into an int32 accumulator — the multiplier-free
arithmetic of a shift-add PE, and the kernel for CPUs without an int8 dot product (armv7,
aarch64 without ``+dotprod``). Widths: ternary/binary 2 bits, pow2-2/pow2-4 3 bits,
pow2-8 … pow2-64 4 bits; ``32 // width`` codes per uint32 word.

Layouts (``pack``):
    dense:  W uint32 [N/16, ceil(K/per), 16]   16-row panels: the vector loop runs over rows
    conv2d: W uint32 [O, ceil(C/g·KH·KW / per)] reduction index r = (c·KH + i)·KW + j
"""

from __future__ import annotations

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    check_codes_shape,
    code_indices,
    code_levels,
    conv2d_reduce,
    conv_tuning_space,
    padded_input,
    schedule_conv_generic,
)

PANEL = 16
WORD_BITS = 32


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def exponent_bits(levels: np.ndarray) -> int:
    """Bits of the exponent field: enough for e = log2(max level) + 1."""
    top = int(np.abs(levels).max())
    return max(1, int(top).bit_length().bit_length())


def field_width(levels: np.ndarray) -> int:
    return exponent_bits(levels) + 1


def is_pow2_set(levels: np.ndarray) -> bool:
    mags = np.abs(levels[levels != 0])
    return bool(mags.size) and bool(np.all((mags & (mags - 1)) == 0))


def encode(codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Codes → sign/exponent fields (uint32): sign << ebits | e."""
    ebits = exponent_bits(levels)
    q = codes.astype(np.int64)
    mag = np.abs(q)
    e = np.where(mag == 0, 0, np.log2(np.maximum(mag, 1)).round().astype(np.int64) + 1)
    return ((q < 0).astype(np.int64) << ebits | e).astype(np.uint32)


def decode(fields: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode` (tests and debugging)."""
    ebits = exponent_bits(levels)
    f = fields.astype(np.int64)
    e = f & ((1 << ebits) - 1)
    mag = np.where(e == 0, 0, 1 << np.maximum(e - 1, 0))
    return np.where(f >> ebits, -mag, mag).astype(np.int32)


def pack_words(fields: np.ndarray, width: int) -> np.ndarray:
    """Fields [..., R] → uint32 words [..., ceil(R/per)], field r at bits (r % per)·width."""
    per = WORD_BITS // width
    r = fields.shape[-1]
    words = -(-r // per)
    padded = np.zeros(fields.shape[:-1] + (words * per,), np.uint64)
    padded[..., :r] = fields
    grouped = padded.reshape(fields.shape[:-1] + (words, per))
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(width))
    return (grouped << shifts).sum(axis=-1).astype(np.uint32)


def pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_codes_shape(layer, codes, "shift-add")
    levels = code_levels(layer.code_set)
    code_indices(codes, levels, f"shift-add {layer.op} {layer.weight_shape}")  # validates the codes
    width = field_width(levels)
    fields = encode(codes, levels)
    if layer.op == "conv2d":
        return [pack_words(fields.reshape(fields.shape[0], -1), width)]
    n, k = fields.shape
    n_pad = -(-n // PANEL) * PANEL
    full = np.zeros((n_pad, k), np.uint32)
    full[:n] = fields
    words = pack_words(full, width)  # [Np, KW]
    return [np.ascontiguousarray(words.reshape(n_pad // PANEL, PANEL, -1).transpose(0, 2, 1))]


# --------------------------------------------------------------------------------------------
# Support
# --------------------------------------------------------------------------------------------


def supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    try:
        levels = code_levels(layer.code_set)
    except KernelError as err:
        return str(err)
    if not is_pow2_set(levels):
        return f"code set {layer.code_set} is not a power-of-two set"
    return None


# --------------------------------------------------------------------------------------------
# TensorIR
# --------------------------------------------------------------------------------------------


def shift_product(value, field, ebits: int):
    """±(value << (e − 1)) for a sign/exponent field; 0 when e = 0. ``value`` is int32."""
    from tvm import tirx

    f = field.astype("int32")
    e = f & ((1 << ebits) - 1)
    sign = (f >> ebits) & 1
    shifted = value << ((e - 1) & 31)  # the mask keeps the shift defined when e = 0
    mag = tirx.Select(e == 0, tirx.const(0, "int32"), shifted)
    return (mag ^ (0 - sign)) + sign


def prim_func(layer: IntLayer):
    from tvm import te, tirx

    levels = code_levels(layer.code_set)
    ebits, width = exponent_bits(levels), field_width(levels)
    per = WORD_BITS // width
    mask = (1 << width) - 1

    def field(word, slot):
        return (word >> (slot * width).astype("uint32")) & tirx.const(mask, "uint32")

    if layer.op == "conv2d":
        x = te.placeholder(layer.data_shape, "int8", name="x_q")
        o, cg, kh, kw = layer.weight_shape
        w = te.placeholder((o, -(-cg * kh * kw // per)), "uint32", name="w_shift")

        def product(value, oc, c, i, j):
            r = (c * kh + i) * kw + j
            return shift_product(value, field(w[oc, r // per], r % per), ebits)

        acc = conv2d_reduce(layer, padded_input(x, layer, "int32"), product)
        return te.create_prim_func([x, w, acc])

    m, k = layer.data_shape
    n = layer.weight_shape[0]
    words = -(-k // per)
    x = te.placeholder((m, k), "int8", name="x_q")
    w = te.placeholder((-(-n // PANEL), words, PANEL), "uint32", name="w_shift")
    rw = te.reduce_axis((0, words), name="kw")
    rs = te.reduce_axis((0, per), name="ks")

    def body(i, j):
        kk = rw * per + rs
        value = x[i, tirx.min(kk, k - 1)].astype("int32")
        prod = shift_product(value, field(w[j // PANEL, rw, j % PANEL], rs), ebits)
        return te.sum(prod, axis=[rw, rs], where=kk < k) if words * per != k else te.sum(prod, axis=[rw, rs])

    acc = te.compute((m, n), body, name="acc")
    return te.create_prim_func([x, w, acc])


def _schedule_dense(sch, layer: IntLayer, unroll_slots: bool = True) -> None:
    """Parallel over 16-row panels, the panel vectorized; the slots of a word unrolled so every
    shift amount is a constant."""
    block = sch.get_sblock("acc")
    i, j, rw, rs = sch.get_loops(block)
    jo, ji = sch.split(j, [None, PANEL])
    sch.reorder(jo, i, rw, rs, ji)
    sch.parallel(jo)
    if unroll_slots:
        sch.unroll(rs)
    if layer.weight_shape[0] % PANEL == 0:
        sch.vectorize(ji)
    sch.decompose_reduction(block, rw)


def schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    if layer.op == "conv2d":
        schedule_conv_generic(sch, layer)
    else:
        _schedule_dense(sch, layer)


def tuning_space(layer: IntLayer, features: frozenset[str]):
    if layer.op == "conv2d":
        return conv_tuning_space(layer)

    def space(sch) -> None:
        _schedule_dense(sch, layer)
        # the remaining knob is how far LLVM may unroll the panel loop nest
        step = sch.sample_categorical([0, 16, 64, 512], [0.25] * 4)
        sch.annotate(sch.get_loops(sch.get_sblock("acc_update"))[0], "pragma_auto_unroll_max_step", step)

    return space


SHIFT_ADD = register_kernel(
    IntKernel(
        name="shift-add",
        supports=supports,
        pack=pack,
        prim_func=prim_func,
        schedule=schedule,
        tuning_space=tuning_space,
        description="power-of-two codes as sign+exponent, int8 activations shifted and added (any CPU)",
    )
)

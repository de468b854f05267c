"""``bitserial``: dense and conv2d for 1–2 bit weights (binary, ternary) by AND + popcount over
bit-planes packed into 64-bit (or 32-bit) words, as TVM's removed bitserial schedules did
(Cowan et al. 2018).

Activations are int8 (two's complement), split inside the kernel into ``act_bits`` planes;
plane p weighs 2^p except the top one, −2^(act_bits−1). A layer whose activations are known
to fit fewer bits (``IntLayer.act_bits``) costs proportionally fewer planes; the default 8 is
exact for every int8 input. Weights, per Cowan's two encodings:

    binary  {−1, +1}  bipolar, one plane B (bit = 1 for +1):
        Σ x·w = 2·Σ_p c_p·popc(x_p & B) − Σ_p c_p·popc(x_p)
    ternary {−1, 0, +1}  two unipolar planes P (+1) and N (−1):
        Σ x·w = Σ_p c_p·(popc(x_p & P) − popc(x_p & N))

Layouts (``pack``), words along the reduction, zero-padded (a zero activation bit adds
nothing, so padding is exact):
    dense:  W [N/lanes, planes, ceil(K/word), lanes]   rows innermost: one vector per word
    conv2d: W [O, planes, ceil(C/g·KH·KW / word)]      r = (c·KH + i)·KW + j
"""

from __future__ import annotations

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, KernelError, register_kernel
from lastbit.codegen.kernels.common import (
    check_codes_shape,
    code_levels,
    conv_output_shape,
)

CODE_SETS = ("binary", "ternary")
WORD_BITS = 64


def word_bits(layer: IntLayer | None = None) -> int:
    """Popcount word: 64 bits everywhere (LLVM splits it into 32-bit vcnt on armv7)."""
    return WORD_BITS


def _act_bits(layer: IntLayer) -> int:
    return int(layer.act_bits)


def _weight_planes(code_set: str) -> int:
    return 1 if code_set == "binary" else 2


def lanes_for(word: int) -> int:
    """Rows per dense panel: one 512-bit vector of words."""
    return 512 // word


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def weight_planes(codes: np.ndarray, code_set: str) -> np.ndarray:
    """Codes [..., R] → planes [..., planes, R] of 0/1 (binary: +1; ternary: +1, −1)."""
    if code_set == "binary":
        return (codes > 0)[..., None, :].astype(np.uint8)
    return np.stack([codes > 0, codes < 0], axis=-2).astype(np.uint8)


def pack_bits(bits: np.ndarray, word: int) -> np.ndarray:
    """0/1 array [..., R] → words [..., ceil(R/word)] (uint32/uint64), bit j of word w = r = w·word + j."""
    r = bits.shape[-1]
    n_words = -(-r // word)
    padded = np.zeros(bits.shape[:-1] + (n_words * word,), np.uint8)
    padded[..., :r] = bits
    little = np.packbits(padded.reshape(bits.shape[:-1] + (n_words, word)), axis=-1, bitorder="little")
    return little.view(np.uint64 if word == 64 else np.uint32).reshape(bits.shape[:-1] + (n_words,))


def pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_codes_shape(layer, codes, "bitserial")
    levels = code_levels(layer.code_set)
    if not np.isin(codes, levels).all():
        bad = int(codes[~np.isin(codes, levels)].flat[0])
        raise KernelError(f"bitserial {layer.op} {layer.weight_shape}: code {bad} is not in {layer.code_set}")
    word = word_bits(layer=layer)
    flat = codes.reshape(codes.shape[0], -1).astype(np.int32)
    planes = pack_bits(weight_planes(flat, layer.code_set), word)  # [O, planes, words]
    if layer.op == "conv2d":
        return [planes]
    lanes = lanes_for(word)
    n = planes.shape[0]
    n_pad = -(-n // lanes) * lanes
    full = np.zeros((n_pad,) + planes.shape[1:], planes.dtype)
    full[:n] = planes
    return [np.ascontiguousarray(full.reshape(n_pad // lanes, lanes, *planes.shape[1:]).transpose(0, 2, 3, 1))]


def supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    if layer.code_set not in CODE_SETS:
        return f"serves 1–2 bit weights ({', '.join(CODE_SETS)}), not {layer.code_set}"
    if not 1 <= _act_bits(layer) <= 8:
        return f"act_bits must be 1..8, got {_act_bits(layer)}"
    return None


# --------------------------------------------------------------------------------------------
# TensorIR
# --------------------------------------------------------------------------------------------


def _plane_weight(p, act_bits: int):
    """c_p as an int32 expression: 2^p, the top plane −2^(act_bits−1)."""
    from tvm import tirx

    top = act_bits - 1
    return tirx.Select(p == top, tirx.const(-(1 << top), "int32"), tirx.const(1, "int32") << p)


def _pack_activations(layer: IntLayer, reduce_len: int, element, word: int, shape_prefix, name: str):
    """planes[..., p, w] = Σ_j bit p of element(..., w·word + j) << j (0 past ``reduce_len``)."""
    from tvm import te, tirx

    dtype = f"uint{word}"
    n_words = -(-reduce_len // word)
    act_bits = _act_bits(layer)
    j = te.reduce_axis((0, word), name="bit")

    def body(*idx):
        *prefix, p, w = idx
        r = w * word + j
        bit = (element(*prefix, tirx.min(r, reduce_len - 1)).astype("int32") >> p) & 1
        value = tirx.Select(r < reduce_len, bit.astype(dtype), tirx.const(0, dtype))
        return te.sum(value << j.astype(dtype), axis=j)

    return te.compute((*shape_prefix, act_bits, n_words), body, name=name)


def _popcount_sum(layer: IntLayer, x_word, w_word, planes: int):
    """The per-word contribution before the plane weight: see the module docstring."""
    from tvm import tirx

    def popc(v):
        return tirx.popcount(v).astype("int32")

    if planes == 1:  # binary, bipolar
        return 2 * popc(x_word & w_word(0)) - popc(x_word)
    return popc(x_word & w_word(0)) - popc(x_word & w_word(1))


def prim_func(layer: IntLayer):
    from tvm import te

    word = word_bits(layer=layer)
    dtype = f"uint{word}"
    planes = _weight_planes(layer.code_set)
    act_bits = _act_bits(layer)

    if layer.op == "conv2d":
        n, _c, h, wd = layer.data_shape
        o, cg, kh, kw = layer.weight_shape
        _, _, oh, ow = conv_output_shape(layer)
        sh, sw = layer.strides
        dh, dw = layer.dilation
        pt, pl, _, _ = layer.padding
        og = o // layer.groups
        red = cg * kh * kw
        n_words = -(-red // word)
        x = te.placeholder(layer.data_shape, "int8", name="x_q")
        w = te.placeholder((o, planes, n_words), dtype, name="w_planes")

        def element(b, g, y, z, r):
            from tvm import tirx

            ci = g * cg + r // (kh * kw)
            yy = y * sh + (r // kw) % kh * dh - pt
            zz = z * sw + r % kw * dw - pl
            inside = tirx.all(yy >= 0, yy < h, zz >= 0, zz < wd)
            safe_y = tirx.max(tirx.min(yy, h - 1), 0)
            safe_z = tirx.max(tirx.min(zz, wd - 1), 0)
            return tirx.if_then_else(inside, x[b, ci, safe_y, safe_z], tirx.const(0, "int8"))

        xp = _pack_activations(layer, red, element, word, (n, layer.groups, oh, ow), "x_planes")
        rp = te.reduce_axis((0, act_bits), name="p")
        rw = te.reduce_axis((0, n_words), name="w")

        def conv_body(b, oc, y, z):
            x_word = xp[b, oc // og, y, z, rp, rw]
            term = _popcount_sum(layer, x_word, lambda q: w[oc, q, rw], planes)
            return te.sum(_plane_weight(rp, act_bits) * term, axis=[rp, rw])

        acc = te.compute((n, o, oh, ow), conv_body, name="acc")
        return te.create_prim_func([x, w, acc])

    m, k = layer.data_shape
    nrows = layer.weight_shape[0]
    lanes = lanes_for(word)
    n_words = -(-k // word)
    x = te.placeholder((m, k), "int8", name="x_q")
    w = te.placeholder((-(-nrows // lanes), planes, n_words, lanes), dtype, name="w_planes")
    xp = _pack_activations(layer, k, lambda i, r: x[i, r], word, (m,), "x_planes")
    rp = te.reduce_axis((0, act_bits), name="p")
    rw = te.reduce_axis((0, n_words), name="w")

    def dense_body(i, jrow):
        x_word = xp[i, rp, rw]
        term = _popcount_sum(layer, x_word, lambda q: w[jrow // lanes, q, rw, jrow % lanes], planes)
        return te.sum(_plane_weight(rp, act_bits) * term, axis=[rp, rw])

    acc = te.compute((m, nrows), dense_body, name="acc")
    return te.create_prim_func([x, w, acc])


def _schedule(sch, layer: IntLayer, unroll_bits: bool = True) -> None:
    xp = sch.get_sblock("x_planes")
    loops = sch.get_loops(xp)
    sch.parallel(sch.fuse(*loops[:-3]) if len(loops) > 4 else loops[0])
    if unroll_bits:
        sch.unroll(loops[-1])
    block = sch.get_sblock("acc")
    loops = sch.get_loops(block)
    if layer.op == "conv2d":
        b, oc, y, z, rp, rw = loops
        sch.parallel(sch.fuse(b, oc))
        sch.reorder(y, rp, rw, z)
        sch.decompose_reduction(block, rp)
        return
    i, j, rp, rw = loops
    lanes = lanes_for(word_bits(layer=layer))
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(jo, i, rp, rw, ji)
    sch.parallel(jo)
    if layer.weight_shape[0] % lanes == 0:
        sch.vectorize(ji)  # vpopcntq on AVX-512 VPOPCNTDQ, cnt + pairwise adds on NEON
    sch.decompose_reduction(block, rp)


def schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Pack activation planes in parallel, then parallel over row panels (dense) or
    (batch, channel) (conv) with the rows of a panel vectorized."""
    _schedule(sch, layer)


def tuning_space(layer: IntLayer, features: frozenset[str]):
    def space(sch) -> None:
        _schedule(sch, layer)
        step = sch.sample_categorical([0, 16, 64, 512], [0.25] * 4)
        sch.annotate(sch.get_loops(sch.get_sblock("acc_update"))[0], "pragma_auto_unroll_max_step", step)

    return space


BITSERIAL = register_kernel(
    IntKernel(
        name="bitserial",
        supports=supports,
        pack=pack,
        prim_func=prim_func,
        schedule=schedule,
        tuning_space=tuning_space,
        description="binary/ternary weights × int8 activation bit-planes, AND + popcount (any CPU)",
    )
)

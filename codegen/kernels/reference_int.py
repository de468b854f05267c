"""The plain integer kernel: int8 activations × int8 weight codes → int32 accumulators, for
any code set, dense and conv2d (any stride, padding, dilation, groups).

It is the kernel every target can fall back to before the float reference path: a direct
TE definition of ``quant_reference.int_dense`` / ``int_conv2d`` with a simple vectorized
schedule (no bit tricks), so the integer path of the whole graph works and is bit-exact
on every target even where no specialised kernel (shift-add, bitserial) serves a layer.
"""

from __future__ import annotations

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, register_kernel

NAME = "reference-int"
SCHEDULE_RULE = "lastbit.reference_int"
DENSE_PANEL = 16  # output features per weight panel: one 512-bit int32 vector, four 128-bit ones
CONV_CHANNEL_BLOCK = 16  # output channels per packed conv weight block (the vectorized axis)
CONV_ROW_TILE = 8  # output columns accumulated in registers at once


def _supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"op {layer.op} (dense and conv2d only)"
    if layer.op == "dense" and len(layer.data_shape) != 2:
        return f"dense input of rank {len(layer.data_shape)} (2-D only)"
    if layer.op == "conv2d" and len(layer.data_shape) != 4:
        return f"conv2d input of rank {len(layer.data_shape)} (NCHW only)"
    return None


def dense_panel(out_features: int) -> int:
    """Output features per packed weight panel (the vectorized axis): the largest power of two
    up to DENSE_PANEL dividing the count, so no panel needs a predicate."""
    return _pow2_divisor(out_features, DENSE_PANEL)


def conv_channel_block(layer: IntLayer) -> int:
    """Output channels per conv weight block: a power of two dividing the channels of one
    group (so a vector never straddles two groups); 1 for depthwise layers."""
    return _pow2_divisor(layer.weight_shape[0] // layer.groups, CONV_CHANNEL_BLOCK)


def _pow2_divisor(extent: int, bound: int) -> int:
    block = bound
    while block > 1 and extent % block:
        block //= 2
    return block


def pack_conv_codes(codes: np.ndarray, ob: int) -> np.ndarray:
    """OIHW int8 codes -> [O/ob, I, KH, KW, ob]: ``ob`` output channels of one tap side by side."""
    o, i, kh, kw = codes.shape
    return np.ascontiguousarray(codes.reshape(o // ob, ob, i, kh, kw).transpose(0, 2, 3, 4, 1))


def pack_dense_codes(codes: np.ndarray, nb: int) -> np.ndarray:
    """[N, K] int8 codes -> [N/nb, K, nb] panels (``nb`` divides N), so the inner loop reads
    ``nb`` consecutive output features of one input feature."""
    n, k = codes.shape
    return np.ascontiguousarray(codes.reshape(n // nb, nb, k).transpose(0, 2, 1))


def _pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = np.asarray(codes, dtype=np.int8)
    if tuple(codes.shape) != tuple(layer.weight_shape):
        raise ValueError(f"{NAME}: codes of shape {codes.shape}, layer weight {layer.weight_shape}")
    if layer.op == "dense":
        return [pack_dense_codes(codes, dense_panel(layer.weight_shape[0]))]
    return [pack_conv_codes(codes, conv_channel_block(layer))]


def conv2d_output_hw(layer: IntLayer) -> tuple[int, int]:
    _, _, h, w = layer.data_shape
    _, _, kh, kw = layer.weight_shape
    pt, pl, pb, pr = layer.padding
    (sh, sw), (dh, dw) = layer.strides, layer.dilation
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _product(a, b):
    """int8 × int8 as int32, multiplied in int16 (|a·b| ≤ 127·127 fits): vectors then use the
    16-bit multiply (twice the lanes of a 32-bit one, e.g. NEON smull) and widen once."""
    return (a.astype("int16") * b.astype("int16")).astype("int32")


def _prim_func(layer: IntLayer):
    from tvm import te, topi

    if layer.op == "dense":
        m, k = layer.data_shape
        n = layer.weight_shape[0]
        nb = dense_panel(n)
        x = te.placeholder((m, k), "int8", name="x_q")
        w = te.placeholder((n // nb, k, nb), "int8", name="codes")
        rk = te.reduce_axis((0, k), name="k")
        acc = te.compute(
            (m, n),
            lambda i, j: te.sum(_product(x[i, rk], w[j // nb, rk, j % nb]), axis=rk),
            name="acc",
            attrs={"schedule_rule": SCHEDULE_RULE},
        )
        return te.create_prim_func([x, w, acc])
    n, c, h, wd = layer.data_shape
    o, cg, kh, kw = layer.weight_shape
    oh, ow = conv2d_output_hw(layer)
    pt, pl, pb, pr = layer.padding
    (sh, sw), (dh, dw) = layer.strides, layer.dilation
    og = o // layer.groups
    ob = conv_channel_block(layer)
    x = te.placeholder((n, c, h, wd), "int8", name="x_q")
    w = te.placeholder((o // ob, cg, kh, kw, ob), "int8", name="codes")
    data = topi.nn.pad(x, [0, 0, pt, pl], [0, 0, pb, pr], pad_value=0, name="x_pad") if any(layer.padding) else x
    rc = te.reduce_axis((0, cg), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def in_channel(f):
        # the group of output channel f, written through its block (ob divides og) so the
        # index is uniform across a vector of ob channels; no term at all without groups
        return rc if layer.groups == 1 else ((f // ob) // (og // ob)) * cg + rc

    acc = te.compute(
        (n, o, oh, ow),
        lambda b, f, y, xx: te.sum(
            _product(data[b, in_channel(f), y * sh + ry * dh, xx * sw + rx * dw], w[f // ob, rc, ry, rx, f % ob]),
            axis=[rc, ry, rx],
        ),
        name="acc",
        attrs={"schedule_rule": SCHEDULE_RULE},
    )
    return te.create_prim_func([x, w, acc])


def _schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Dense: parallel over weight panels, the panel's ``nb`` outputs in one vector register
    across the reduction.  Conv2d: parallel over (batch, channel block, row), a register tile
    of up to 8 columns × ``ob`` channels (one vector per column); depthwise layers (``ob`` 1)
    accumulate one output row in registers, vectorized along it."""
    block = sch.get_sblock("acc")
    if layer.op == "dense":
        nb = dense_panel(layer.weight_shape[0])
        i, j, k = sch.get_loops(block)
        jo, ji = sch.split(j, [None, nb])
        sch.reorder(jo, i, k, ji)
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, i)
        sch.parallel(jo)
        if nb > 1:
            sch.vectorize(ji)
        sch.decompose_reduction(block, k)
        return
    if any(layer.padding):
        pad = sch.get_sblock("x_pad")
        b, ch, y, x = sch.get_loops(pad)
        sch.parallel(sch.fuse(b, ch))
    b, f, y, x, rc, ry, rx = sch.get_loops(block)
    ob = conv_channel_block(layer)
    if ob > 1:  # register tile: CONV_ROW_TILE columns × ob channels, the channels in one vector
        fo, fi = sch.split(f, [None, ob])
        xt = _pow2_divisor(int(sch.get(x).extent), CONV_ROW_TILE)
        xo, xi = sch.split(x, [None, xt])
        sch.reorder(b, fo, y, xo, rc, ry, rx, xi, fi)
        local = sch.cache_write(block, 0, "local")
        # the register tile channel-innermost, so each column's accumulators are one vector
        sch.transform_layout(block, ("write", 0), lambda n_, c_, h_, w_: (n_, c_ // ob, h_, w_, c_ % ob))
        sch.reverse_compute_at(local, xo)
        sch.parallel(sch.fuse(b, fo, y))
        sch.vectorize(fi)
        sch.unroll(xi)
        sch.decompose_reduction(block, rc)
        return
    sch.reorder(b, f, y, rc, ry, rx, x)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, y)
    sch.parallel(sch.fuse(b, f))
    if int(sch.get(x).extent) <= 64:
        sch.vectorize(x)
    sch.decompose_reduction(block, rc)


REFERENCE_INT = register_kernel(
    IntKernel(
        name=NAME,
        supports=_supports,
        pack=_pack,
        prim_func=_prim_func,
        schedule=_schedule,
        description="int8 × int8 codes → int32, plain loops; serves any code set on any target",
    )
)

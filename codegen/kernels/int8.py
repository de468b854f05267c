"""int8 × int8 → int32 kernels: the fallback that serves every code set (``int8`` included).

* ``int8-vnni`` — dense on x86 with AVX-512 VNNI: weights laid out as the 16×4 int8 operand of
  ``vpdpbusd`` ([N/16, K/4, 16, 4]); activations enter as ``x + 128`` (uint8, what vpdpbusd
  wants) and ``128·Σ_k w[n, k]`` is subtracted at the end, so the result is exact.
* ``int8`` — dense and conv2d on any CPU (x86 AVX2/AVX-512, aarch64 NEON, armv7 NEON): plain
  widening multiply-adds that LLVM vectorizes (vpmaddwd / smlal). Dense weights are packed in
  panels of ``PANEL`` output rows ([N/16, K, 16]) so the vector loop reads contiguous bytes.

ARM's direct int8 kernels (``sdot`` with ``+dotprod``, int16 ``smlal`` without) are in ``neon_int.py``.
"""

from __future__ import annotations

import numpy as np

from lastbit.codegen.kernels import IntKernel, IntLayer, register_kernel
from lastbit.codegen.kernels.common import (
    X86_VNNI_FEATURES,
    check_int8_codes,
    conv2d_reduce,
    conv_tuning_space,
    first_missing,
    padded_input,
    register_vnni_intrin,
    schedule_conv_generic,
)

ROWS, DEPTH = 16, 4  # the vpdpbusd operand
PANEL = 16  # output rows per panel of the generic dense kernel


def _pad_to(n: int, block: int) -> int:
    return -(-n // block) * block


# --------------------------------------------------------------------------------------------
# int8-vnni (dense, x86)
# --------------------------------------------------------------------------------------------


def vnni_pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_int8_codes(layer, codes, "int8-vnni")
    n, k = codes.shape
    np_, kp = _pad_to(n, ROWS), _pad_to(k, DEPTH)
    full = np.zeros((np_, kp), np.int8)
    full[:n, :k] = codes
    tiles = full.reshape(np_ // ROWS, ROWS, kp // DEPTH, DEPTH).transpose(0, 2, 1, 3)
    rowsum = codes.astype(np.int64).sum(axis=1).astype(np.int32)
    return [np.ascontiguousarray(tiles), rowsum]


def vnni_supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op != "dense":
        return f"serves dense layers only, not {layer.op}"
    return first_missing(features, X86_VNNI_FEATURES)


def vnni_prim_func(layer: IntLayer):
    from tvm import te, tirx

    m, k = layer.data_shape
    n = layer.weight_shape[0]
    np_, kp = _pad_to(n, ROWS), _pad_to(k, DEPTH)
    x = te.placeholder((m, k), "int8", name="x_q")
    w = te.placeholder((np_ // ROWS, kp // DEPTH, ROWS, DEPTH), "int8", name="w_tiles")
    rowsum = te.placeholder((n,), "int32", name="rowsum")
    xu = te.compute(
        (m, kp),
        lambda i, j: tirx.if_then_else(
            j < k, (x[i, tirx.min(j, k - 1)].astype("int32") + 128).astype("uint8"), tirx.const(0, "uint8")
        ),
        name="x_u8",
    )
    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (m, np_),
        lambda i, j: te.sum(
            xu[i, r].astype("int32") * w[j // ROWS, r // DEPTH, j % ROWS, r % DEPTH].astype("int32"), axis=r
        ),
        name="acc",
    )
    out = te.compute((m, n), lambda i, j: acc[i, j] - 128 * rowsum[j], name="out")
    return te.create_prim_func([x, w, rowsum, out])


def _divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def _vnni_apply(sch, layer: IntLayer, row_blocks, m_tile) -> None:
    intrin = register_vnni_intrin()
    block = sch.get_sblock("acc")
    i, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, [None, ROWS])
    task, jb = sch.split(jo, [None, row_blocks])
    io, ii = sch.split(i, [None, m_tile])
    ko, ki = sch.split(r, [None, DEPTH])
    # row blocks × rows side by side: independent vpdpbusd chains, one weight load per m_tile rows
    sch.reorder(task, io, ko, jb, ii, ji, ki)
    sch.parallel(task)
    sch.reverse_compute_at(sch.get_sblock("out"), task)
    sch.decompose_reduction(block, ko)
    sch.tensorize(ji, intrin)
    sch.unroll(jb)
    sch.unroll(ii)
    _xi, xj = sch.get_loops(sch.get_sblock("x_u8"))
    _, xv = sch.split(xj, [None, 64])
    sch.vectorize(xv)


def vnni_schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Parallel over 16-row blocks; up to 4 blocks × 4 input rows of accumulators in registers."""
    blocks = _pad_to(layer.weight_shape[0], ROWS) // ROWS
    m = layer.data_shape[0]
    m_tile = _divisor_at_most(m, 4)
    _vnni_apply(sch, layer, _divisor_at_most(blocks, 4 if m_tile == 1 else 2), m_tile)


def vnni_tuning_space(layer: IntLayer, features: frozenset[str]):
    blocks = _pad_to(layer.weight_shape[0], ROWS) // ROWS
    rows = [c for c in (1, 2, 4, 8) if blocks % c == 0]
    tiles = [c for c in (1, 2, 4, 8) if layer.data_shape[0] % c == 0]

    def space(sch) -> None:
        rb = rows[0] if len(rows) == 1 else sch.sample_categorical(rows, [1 / len(rows)] * len(rows))
        mt = tiles[0] if len(tiles) == 1 else sch.sample_categorical(tiles, [1 / len(tiles)] * len(tiles))
        _vnni_apply(sch, layer, rb, mt)

    return space


# --------------------------------------------------------------------------------------------
# int8 (generic: dense + conv2d, any CPU)
# --------------------------------------------------------------------------------------------


def generic_pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_int8_codes(layer, codes, "int8")
    if layer.op == "conv2d":
        return [np.ascontiguousarray(codes)]
    n, k = codes.shape
    full = np.zeros((_pad_to(n, PANEL), k), np.int8)
    full[:n] = codes
    return [np.ascontiguousarray(full.reshape(-1, PANEL, k).transpose(0, 2, 1))]


def generic_supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    return None


def generic_prim_func(layer: IntLayer):
    from tvm import te

    if layer.op == "conv2d":
        x = te.placeholder(layer.data_shape, "int8", name="x_q")
        w = te.placeholder(layer.weight_shape, "int8", name="w_codes")
        data = padded_input(x, layer, "int32")
        acc = conv2d_reduce(layer, data, lambda v, o, c, i, j: v * w[o, c, i, j].astype("int32"))
        return te.create_prim_func([x, w, acc])
    m, k = layer.data_shape
    n = layer.weight_shape[0]
    x = te.placeholder((m, k), "int8", name="x_q")
    w = te.placeholder((_pad_to(n, PANEL) // PANEL, k, PANEL), "int8", name="w_panels")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype("int32") * w[j // PANEL, r, j % PANEL].astype("int32"), axis=r),
        name="acc",
    )
    return te.create_prim_func([x, w, acc])


def k_unroll_choices(layer: IntLayer) -> list[int]:
    return [u for u in (1, 2, 4, 8) if layer.data_shape[1] % u == 0]


def schedule_dense_panels(sch, layer: IntLayer, panel: int, k_unroll=None, block_name: str = "acc") -> None:
    """Dense over weights packed in panels of ``panel`` rows: parallel over panels, the panel
    vectorized, the reduction outside it, unrolled by ``k_unroll`` (an int or a sampled
    variable). Shared by the int8, shift-add and bitserial kernels."""
    if k_unroll is None:
        k_unroll = max(k_unroll_choices(layer)[:3])
    block = sch.get_sblock(block_name)
    i, j, r = sch.get_loops(block)[:3]
    jo, ji = sch.split(j, [None, panel])
    ro, rk = sch.split(r, [None, k_unroll])
    sch.reorder(jo, i, ro, rk, ji)
    sch.parallel(jo)
    sch.unroll(rk)
    if layer.weight_shape[0] % panel == 0:
        sch.vectorize(ji)  # before decompose_reduction: the update block alone is not vectorizable
    sch.decompose_reduction(block, ro)


def generic_schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Dense: parallel over 16-row panels, the panel vectorized. Conv2d: direct, vectorized
    along the output row (see ``common.schedule_conv_generic``)."""
    if layer.op == "conv2d":
        schedule_conv_generic(sch, layer)
    else:
        schedule_dense_panels(sch, layer, PANEL)


def generic_tuning_space(layer: IntLayer, features: frozenset[str]):
    if layer.op == "conv2d":
        return conv_tuning_space(layer)
    choices = k_unroll_choices(layer)

    def space(sch) -> None:
        unroll = choices[0] if len(choices) == 1 else sch.sample_categorical(choices, [1 / len(choices)] * len(choices))
        schedule_dense_panels(sch, layer, PANEL, k_unroll=unroll)

    return space


INT8_VNNI = register_kernel(
    IntKernel(
        name="int8-vnni",
        supports=vnni_supports,
        pack=vnni_pack,
        prim_func=vnni_prim_func,
        schedule=vnni_schedule,
        tuning_space=vnni_tuning_space,
        description="int8 codes, dense, vpdpbusd (x86 AVX-512 VNNI)",
    )
)

INT8 = register_kernel(
    IntKernel(
        name="int8",
        supports=generic_supports,
        pack=generic_pack,
        prim_func=generic_prim_func,
        schedule=generic_schedule,
        tuning_space=generic_tuning_space,
        description="int8 codes, dense and conv2d, vectorized widening multiply-add (any CPU)",
    )
)

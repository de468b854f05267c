"""``bitserial``: dense and conv2d for 1–2 bit weights (binary, ternary) × k-bit activations by
AND + popcount over bit-planes packed along the reduction axis (Cowan et al., CGO'20).

Activations arrive as int8 codes known to fit ``IntLayer.act_bits`` bits: unsigned
(``act_unsigned``, 0..2^k−1, e.g. after a ReLU) or two's complement (−2^(k−1)..2^(k−1)−1).
The kernel splits them into k planes; plane p weighs c_p = 2^p, except the top plane of a
signed code, −2^(k−1). Weights, per Cowan's two encodings:

    binary  {−1, +1}  bipolar, one plane B (bit = 1 for +1):
        Σ x·w = Σ_p c_p·(2·popc(x_p & B) − popc(x_p))
    ternary {−1, 0, +1}  two unipolar planes P (+1) and N (−1):
        Σ x·w = Σ_p c_p·(popc(x_p & P) − popc(x_p & N))

Why bytes and output channels in vector lanes: the hot loop is one broadcast activation byte
AND a vector of 16 weight bytes (16 output rows/channels), ``popcount`` on uint8 lanes (one
NEON ``cnt``, AVX-512 ``vpopcntb``) and a uint8 add, with no horizontal reduction. A uint8 lane
holds at most 255, so the reduction runs in blocks of at most ``MAX_BLOCK_BYTES`` bytes (8 bits
each), widened into uint16 per block; the plane weights are applied once per output.

Conv, ternary: one uint8 counter per activation plane takes popc(x & P) − popc(x & N) per byte
(modulo 256; blocks of at most ``TERNARY_BLOCK_BYTES`` keep its int8 view exact) and widens
into int16 — half the counters and widenings of separate P and N counts. Per output pixel a
register tile of ``vectors`` × 16 output channels (``conv_vectors``: 2 when O allows) keeps its
counters and 16-bit sums in registers over the whole window; each activation vector it loads
serves 2·q ANDs per vector of the tile.

Layouts (``pack``), bytes along the reduction, zero-padded (a zero bit adds nothing, so padding
is exact):
    dense:  W [ceil(N/L), planes, KB, L]            L = 64 if N % 64 == 0 else 16 (``lanes``);
                                                    KB = ceil(K/8) rounded up to 16-byte blocks;
            in block B, bit j of byte b is element 128·B + 16·j + b (``dense_bit_order``)
    conv2d: W [ceil(O/16)/V, KH, KW, CB, V, planes, 16]   V = ``conv_vectors``; CB =
            ceil(C/groups / 8); bit j of byte c is input channel 8·c + j; the V·planes vectors
            one byte of a tile meets are adjacent (ldp pairs)
The activations are packed inside the kernel: dense [M, k, KB]; conv2d planes 16 pixels at a
time along the padded input row (contiguous int8 loads per channel), each byte then repeated
across the 16 lanes of a vector (``dup`` lane), [N, G, H+pad, W+pad, CB, k, 16]: the hot loop
loads its broadcast operand as a plain vector, both planes in one ``ldp``, not one ``ld1r`` and
address add per byte.
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
LANES = 16  # output rows/channels per vector: one 128-bit NEON register of uint8
WIDE_LANES = 64  # dense rows per vector when N allows: one AVX-512 register (four NEON ones)
MAX_BLOCK_BYTES = 31  # 31 bytes · 8 bits ≤ 255: a uint8 lane cannot overflow inside a block
# conv, ternary: one uint8 counter sums popc(x & P) − popc(x & N) ∈ [−8, 8] per byte modulo 256;
# over ≤ 15 bytes the true sum lies in [−120, 120], so its int8 view is exact
TERNARY_BLOCK_BYTES = 15
DENSE_BLOCK_BYTES = 16
MAX_CONV_REDUCTION = 32767  # conv: per-plane sums held in int16 (ternary) / uint16 (binary) lanes


def _weight_planes(code_set: str) -> int:
    return 1 if code_set == "binary" else 2


def plane_weights(act_bits: int, unsigned: bool) -> list[int]:
    """c_p of each activation plane: 2^p; the top plane of a signed code is −2^(k−1)."""
    weights = [1 << p for p in range(act_bits)]
    if not unsigned:
        weights[-1] = -weights[-1]
    return weights


# --------------------------------------------------------------------------------------------
# Packing (numpy)
# --------------------------------------------------------------------------------------------


def weight_planes(codes: np.ndarray, code_set: str) -> np.ndarray:
    """Codes [..., R] → planes [..., planes, R] of 0/1 (binary: +1; ternary: +1, −1)."""
    if code_set == "binary":
        return (codes > 0)[..., None, :].astype(np.uint8)
    return np.stack([codes > 0, codes < 0], axis=-2).astype(np.uint8)


def pack_bits(bits: np.ndarray, word: int) -> np.ndarray:
    """0/1 array [..., R] → words [..., ceil(R/word)] (uint8/16/32/64), bit j of word w = r = w·word + j."""
    r = bits.shape[-1]
    n_words = -(-r // word)
    padded = np.zeros(bits.shape[:-1] + (n_words * word,), np.uint8)
    padded[..., :r] = bits
    little = np.packbits(padded.reshape(bits.shape[:-1] + (n_words, word)), axis=-1, bitorder="little")
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[word]
    return little.view(dtype).reshape(bits.shape[:-1] + (n_words,))


def lanes(layer: IntLayer) -> int:
    """Output rows per weight panel: 64 for a dense layer with N % 64 == 0 (a zmm of uint8 on
    x86, where 16 lanes would leave 3/4 of each vector idle; four q registers on NEON), else 16."""
    n = layer.weight_shape[0]
    return WIDE_LANES if layer.op == "dense" and n % WIDE_LANES == 0 else LANES


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def dense_bytes(k: int) -> int:
    """Packed bytes per dense row: ceil(K/8) rounded up to whole blocks."""
    return _round_up(-(-k // 8), DENSE_BLOCK_BYTES)


def dense_bit_order(bits: np.ndarray) -> np.ndarray:
    """[..., KB·8] in reduction order → the dense packing order: inside each block of
    ``DENSE_BLOCK_BYTES`` bytes, bit j of byte b is element 16·j + b of the block's 128, so the
    kernel packs 16 bytes from 8 contiguous 16-element loads (no gathers)."""
    lead = bits.shape[:-1]
    blocks = bits.reshape(*lead, -1, 8, DENSE_BLOCK_BYTES)  # [..., block, j, b]
    return np.swapaxes(blocks, -1, -2).reshape(*lead, -1)  # [..., block, b, j]


def conv_block_bytes(layer: IntLayer) -> int:
    """Bytes one uint8 conv counter may sum: ``TERNARY_BLOCK_BYTES`` for the signed ternary
    difference, ``MAX_BLOCK_BYTES`` for a binary count."""
    return MAX_BLOCK_BYTES if layer.code_set == "binary" else TERNARY_BLOCK_BYTES


def conv_blocking(layer: IntLayer) -> tuple[int, int]:
    """(CB, CBI): packed input-channel bytes, and how many of them one uint8 block takes along
    with the whole kernel row (KW·CBI ≤ ``conv_block_bytes``; CBI divides CB)."""
    _o, cg, _kh, kw = layer.weight_shape
    cb = -(-cg // 8)
    fits = [d for d in range(1, cb + 1) if cb % d == 0 and kw * d <= conv_block_bytes(layer)]
    return cb, (max(fits) if fits else 0)


def pack(layer: IntLayer, codes: np.ndarray) -> list[np.ndarray]:
    codes = check_codes_shape(layer, codes, "bitserial")
    levels = code_levels(layer.code_set)
    if not np.isin(codes, levels).all():
        bad = int(codes[~np.isin(codes, levels)].flat[0])
        raise KernelError(f"bitserial {layer.op} {layer.weight_shape}: code {bad} is not in {layer.code_set}")
    o = codes.shape[0]
    width = lanes(layer)
    o_pad = _round_up(o, width)
    if layer.op == "conv2d":
        _, cg, kh, kw = codes.shape
        cb, _ = conv_blocking(layer)
        planes = weight_planes(codes.transpose(0, 2, 3, 1).astype(np.int32), layer.code_set)  # [O, KH, KW, q, Cg]
        packed = pack_bits(planes, 8)  # [O, KH, KW, q, CB]
        full = np.zeros((o_pad, kh, kw, packed.shape[3], cb), np.uint8)
        full[:o] = packed
        v = conv_vectors(layer)
        # [O/16V, V, 16, KH, KW, q, CB] -> [O/16V, KH, KW, CB, V, q, 16]: the V·q vectors one
        # byte of the tile ANDs with are adjacent (ldp pairs)
        tiles = full.reshape(o_pad // (LANES * v), v, LANES, kh, kw, -1, cb)
        return [np.ascontiguousarray(tiles.transpose(0, 3, 4, 6, 1, 5, 2))]
    kb = dense_bytes(codes.shape[1])
    bits = weight_planes(codes.astype(np.int32), layer.code_set)  # [N, q, K]
    padded = np.zeros(bits.shape[:2] + (kb * 8,), np.uint8)
    padded[..., : bits.shape[2]] = bits
    packed = pack_bits(dense_bit_order(padded), 8)  # [N, q, KB]
    full = np.zeros((o_pad, packed.shape[1], kb), np.uint8)
    full[:o] = packed
    return [np.ascontiguousarray(full.reshape(o_pad // width, width, -1, kb).transpose(0, 2, 3, 1))]


def supports(layer: IntLayer, features: frozenset[str]) -> str | None:
    if layer.op not in ("dense", "conv2d"):
        return f"serves dense and conv2d, not {layer.op}"
    if layer.code_set not in CODE_SETS:
        return f"serves 1–2 bit weights ({', '.join(CODE_SETS)}), not {layer.code_set}"
    if not 1 <= int(layer.act_bits) <= 8:
        return f"act_bits must be 1..8, got {layer.act_bits}"
    if layer.act_unsigned and layer.act_bits > 7:
        return "unsigned activations fit int8 codes only up to 7 bits"
    if layer.op == "conv2d" and conv_blocking(layer)[1] == 0:
        return f"kernel width {layer.weight_shape[3]} exceeds one {conv_block_bytes(layer)}-byte block"
    if layer.op == "conv2d" and int(np.prod(layer.weight_shape[1:])) > MAX_CONV_REDUCTION:
        return f"reduction {int(np.prod(layer.weight_shape[1:]))} exceeds the 16-bit counters ({MAX_CONV_REDUCTION})"
    return None


# --------------------------------------------------------------------------------------------
# TensorIR
# --------------------------------------------------------------------------------------------


def _plane_byte(value_at, valid, p):
    """Σ_j ((x_j >> p) & 1) << j over the 8 elements of one byte (``value_at(j)``, int8; 0 where
    ``valid(j)`` is false), as uint8."""
    from tvm import tirx

    total = None
    for j in range(8):
        bit = ((value_at(j) >> p.astype("int8")) & tirx.const(1, "int8")).astype("uint8")
        bit = tirx.Select(valid(j), bit, tirx.const(0, "uint8")) if valid(j) is not True else bit
        term = bit << tirx.const(j, "uint8") if j else bit
        total = term if total is None else total | term
    return total


def _popc16(v):
    from tvm import tirx

    return tirx.popcount(v).astype("uint16")


def _combine(layer: IntLayer, plane_dot):
    """The int32 accumulator Σ_p c_p · ``plane_dot(p)``, where ``plane_dot(p)`` is the int32
    dot product of activation plane p with the weights."""
    from tvm import tirx

    total = None
    for p, c in enumerate(plane_weights(int(layer.act_bits), bool(layer.act_unsigned))):
        term = plane_dot(p)
        term = term * tirx.const(c, "int32") if c != 1 else term
        total = term if total is None else total + term
    return total


def _plane_dot(layer: IntLayer, count, xcount=None):
    """Σ x_p·w from uint popcounts ``count(q)`` of the activation plane AND weight plane q:
    binary (bipolar) 2·popc(x & B) − popc(x) (``xcount``), ternary popc(x & P) − popc(x & N)."""
    if layer.code_set == "binary":
        return 2 * count(0).astype("int32") - xcount
    return count(0).astype("int32") - count(1).astype("int32")


def prim_func(layer: IntLayer):
    from tvm import te, tirx

    q_planes = _weight_planes(layer.code_set)
    act_bits = int(layer.act_bits)

    if layer.op == "conv2d":
        n, c, h, wd = layer.data_shape
        o, cg, kh, kw = layer.weight_shape
        _, _, oh, ow = conv_output_shape(layer)
        sh, sw = layer.strides
        dh, dw = layer.dilation
        pt, pl, pb, pr = layer.padding
        groups = layer.groups
        og = o // groups
        cb, cbi = conv_blocking(layer)
        hp, wp = h + pt + pb, wd + pl + pr
        x = te.placeholder(layer.data_shape, "int8", name="x_q")
        v = conv_vectors(layer)
        w = te.placeholder((-(-o // LANES) // v, kh, kw, cb, v, q_planes, LANES), "uint8", name="w_planes")

        def x_byte(b, p, g, yy, byte, zz):
            y, z = yy - pt, zz - pl
            inside = tirx.all(y >= 0, y < h, z >= 0, z < wd)
            sy, sz = tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(z, wd - 1), 0)

            def channel(j):
                return byte * 8 + j

            def value_at(j):
                ci = g * cg + tirx.min(channel(j), cg - 1)
                return x[b, ci, sy, sz]

            def valid(j):
                return inside if (cg % 8 == 0) else tirx.all(inside, channel(j) < cg)

            return _plane_byte(value_at, valid, p)

        wrow = _round_up(wp, LANES)  # whole 16-byte vectors along the padded row
        xb = te.compute((n, act_bits, groups, hp, cb, wrow), x_byte, name="x_planes")
        # every plane byte repeated in the 16 lanes of a vector: the hot loop loads its
        # broadcast operand as a plain vector (two planes per ldp) instead of a ld1r each
        xv = te.compute((n, groups, hp, wrow, cb, act_bits, LANES),
                        lambda b, g, yy, zz, byte, p, lane: xb[b, p, g, yy, byte, zz], name="x_lanes")
        rj = te.reduce_axis((0, kw), name="rj")
        rci = te.reduce_axis((0, cbi), name="rci")

        def part8_body(b, y, z, p, ri, rco, oc):
            byte = rco * cbi + rci
            xval = xv[b, oc // og, y * sh + ri * dh, z * sw + rj * dw, byte, p, oc % LANES]

            def count(q):
                return tirx.popcount(xval & w[oc // (LANES * v), ri, rj, byte, oc // LANES % v, q, oc % LANES])

            # ternary: popc(x & P) − popc(x & N) ∈ [−8, 8] per byte, summed modulo 256 over a
            # block of ≤ TERNARY_BLOCK_BYTES bytes: the int8 view of the sum is exact
            return te.sum(count(0) if q_planes == 1 else count(0) - count(1), axis=[rj, rci])

        part8 = te.compute((n, oh, ow, act_bits, kh, cb // cbi, o), part8_body, name="part8")
        ri = te.reduce_axis((0, kh), name="ri")
        rco = te.reduce_axis((0, cb // cbi), name="rco")
        wide = "uint16" if q_planes == 1 else "int16"

        def widen(v):
            return v.astype(wide) if q_planes == 1 else tirx.reinterpret("int8", v).astype(wide)

        part = te.compute(
            (n, oh, ow, act_bits, o),
            lambda b, y, z, p, oc: te.sum(widen(part8[b, y, z, p, ri, rco, oc]), axis=[ri, rco]),
            name="part",
        )
        tensors = [x, w]
        xcount = None
        if layer.code_set == "binary":
            ci = te.reduce_axis((0, kh), name="ci")
            cj = te.reduce_axis((0, kw), name="cj")
            cc = te.reduce_axis((0, cb), name="cc")
            xcount = te.compute(
                (n, groups, act_bits, oh, ow),
                lambda b, g, p, y, z: te.sum(
                    tirx.popcount(xv[b, g, y * sh + ci * dh, z * sw + cj * dw, cc, p, 0]).astype("int32"), axis=[ci, cj, cc]
                ),
                name="x_count",
            )
        acc = te.compute(
            (n, o, oh, ow),
            lambda b, oc, y, z: _combine(layer, lambda p: (
                part[b, y, z, p, oc].astype("int32") if xcount is None
                else _plane_dot(layer, lambda q: part[b, y, z, p, oc], xcount[b, oc // og, p, y, z]))),
            name="acc",
        )
        return te.create_prim_func([*tensors, acc])

    m, k = layer.data_shape
    nrows = layer.weight_shape[0]
    kb = dense_bytes(k)
    x = te.placeholder((m, k), "int8", name="x_q")
    width = lanes(layer)
    w = te.placeholder((-(-nrows // width), q_planes, kb, width), "uint8", name="w_planes")

    def x_byte(i, p, byte):
        def element(j):  # see dense_bit_order
            return byte // DENSE_BLOCK_BYTES * (8 * DENSE_BLOCK_BYTES) + j * DENSE_BLOCK_BYTES + byte % DENSE_BLOCK_BYTES

        def value_at(j):
            return x[i, tirx.min(element(j), k - 1)]

        def valid(j):
            return True if k % (8 * DENSE_BLOCK_BYTES) == 0 else element(j) < k

        return _plane_byte(value_at, valid, p)

    xb = te.compute((m, act_bits, kb), x_byte, name="x_planes")
    rr = te.reduce_axis((0, DENSE_BLOCK_BYTES), name="rr")
    part8 = te.compute(
        (m, act_bits, q_planes, kb // DENSE_BLOCK_BYTES, nrows),
        lambda i, p, q, blk, jrow: te.sum(
            tirx.popcount(xb[i, p, blk * DENSE_BLOCK_BYTES + rr] & w[jrow // width, q, blk * DENSE_BLOCK_BYTES + rr,
                                                                   jrow % width]), axis=rr),
        name="part8",
    )
    rb = te.reduce_axis((0, kb // DENSE_BLOCK_BYTES), name="rb")
    part = te.compute(
        (m, act_bits, q_planes, nrows),
        lambda i, p, q, jrow: te.sum(part8[i, p, q, rb, jrow].astype("uint16"), axis=rb),
        name="part",
    )
    xcount = None
    if layer.code_set == "binary":
        rc = te.reduce_axis((0, kb), name="rc")
        xcount = te.compute((m, act_bits), lambda i, p: te.sum(tirx.popcount(xb[i, p, rc]).astype("int32"), axis=rc),
                            name="x_count")
    acc = te.compute(
        (m, nrows),
        lambda i, jrow: _combine(layer, lambda p: _plane_dot(layer, lambda q: part[i, p, q, jrow],
                                                             None if xcount is None else xcount[i, p])),
        name="acc",
    )
    return te.create_prim_func([x, w, acc])


def _loops_by_axis(sch, block, anchor) -> dict:
    """Axis name of the block (as in its TE compute: "p", "q", "rr", …) -> the loop that
    binds it, among the loops compute_at created under ``anchor`` (it drops unit loops, so
    positions shift)."""
    from tvm.tirx.analysis import undefined_vars

    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body
    anchor_var = sch.get(anchor).loop_var
    start = next(i for i, loop in enumerate(loops) if sch.get(loop).loop_var.same_as(anchor_var)) + 1
    by_var = {sch.get(loop).loop_var: loop for loop in loops[start:]}
    found = {}
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        used = [v for v in undefined_vars(value) if v in by_var]
        if len(used) == 1:
            found[str(iv.var.name).removeprefix("v_")] = by_var[used[-1]]
    return found


def conv_vectors(layer: IntLayer) -> int:
    """Default oc vectors (of 16 channels) per register tile: 2 when O allows — each broadcast
    activation vector then serves 2 × q ANDs, and the tile (2 × act_bits uint8 counters, their
    16-bit sums, 2·q weight vectors) still fits the 32 NEON registers."""
    return 2 if -(-layer.weight_shape[0] // LANES) % 2 == 0 else 1


def _schedule(sch, layer: IntLayer, vectors=None) -> None:
    """Output rows/channels in vector lanes; for conv ``vectors`` 16-channel vectors per
    register tile, whose counters stay in registers over the pixel's whole reduction."""
    width = lanes(layer)
    vectorizable = layer.weight_shape[0] % width == 0
    acc = sch.get_sblock("acc")
    part = sch.get_sblock("part")
    part8 = sch.get_sblock("part8")
    if layer.op == "conv2d":
        _schedule_conv(sch, layer, acc, part, part8, conv_vectors(layer) if vectors is None else vectors,
                       vectorizable)
        return
    i, j = sch.get_loops(acc)
    jo, ji = sch.split(j, [None, width])
    sch.reorder(jo, i, ji)
    _parallel_tasks(sch, jo, -(-layer.weight_shape[0] // width), _bit_products(layer))
    sch.compute_at(part, i)
    sch.set_scope(part, 0, "local")
    ax = _loops_by_axis(sch, part, i)
    _reorder_present(sch, ax, ["rb", "p", "q", "jrow"])
    anchor = ax.get("rb") or i
    sch.compute_at(part8, anchor)
    sch.set_scope(part8, 0, "local")
    ax8 = _loops_by_axis(sch, part8, anchor)
    _reorder_present(sch, ax8, ["rr", "p", "q", "jrow"])
    _vectorize_inner(sch, [part8, part, acc], vectorizable)
    sch.decompose_reduction(part8, ax8["rr"])
    sch.decompose_reduction(part, next(ax[a] for a in ("rb", "p", "q", "jrow") if a in ax))
    for name in ("p", "q"):
        if name in ax8:
            sch.unroll(ax8[name])
    xp = sch.get_sblock("x_planes")
    xl = sch.get_loops(xp)
    sch.parallel(xl[0])
    _, xb = sch.split(xl[-1], [None, DENSE_BLOCK_BYTES])
    sch.vectorize(xb)  # 8 contiguous 16-byte loads per packed vector (dense_bit_order)


def _schedule_conv(sch, layer: IntLayer, acc, part, part8, vectors, vectorizable: bool) -> None:
    """Per output pixel and tile of ``vectors`` × 16 output channels: for each kernel row and
    channel block, uint8 counters over the block's bytes (AND, cnt, add, all unrolled), widened
    once per block into 16-bit sums held in registers over the pixel's whole reduction.
    Activation planes are packed first, then repeated in lanes."""
    tile = vectors * LANES
    b, oc, y, z = sch.get_loops(acc)
    oo, oi = sch.split(oc, [None, tile])
    sch.reorder(b, oo, y, z, oi)
    _parallel_tasks(sch, sch.fuse(b, oo), layer.data_shape[0] * -(-layer.weight_shape[0] // tile),
                    _bit_products(layer))
    sch.compute_at(part, z)
    sch.set_scope(part, 0, "local")
    ax = _loops_by_axis(sch, part, z)
    _reorder_present(sch, ax, ["ri", "rco", "p", "oc"])
    anchor = ax.get("rco") or ax.get("ri") or z
    sch.compute_at(part8, anchor)
    sch.set_scope(part8, 0, "local")
    ax8 = _loops_by_axis(sch, part8, anchor)
    _reorder_present(sch, ax8, ["rj", "rci", "p", "oc"])
    first8 = next(ax8[a] for a in ("rj", "rci", "p", "oc") if a in ax8)
    first = next(ax[a] for a in ("ri", "rco", "p", "oc") if a in ax)
    for block in (part8, part, acc):
        inner = sch.get_loops(block)[-1]
        if vectorizable and vectors > 1:
            outer, inner = sch.split(inner, [vectors, LANES])
            sch.unroll(outer)
        if vectorizable:
            sch.vectorize(inner)
    part8_init = sch.decompose_reduction(part8, first8)
    part_init = sch.decompose_reduction(part, first)
    # every loop of the pixel's reduction unrolled but the channel-block one: the counters and
    # 16-bit sums are indexed by constants only, so LLVM keeps them in registers
    keep = [ax[a] for a in ("ri", "rco") if a in ax]
    for block in (part8_init, part8, part_init, part):
        _unroll_serial_below(sch, block, z, keep)
    # planes 16 pixels at a time along the padded input row (contiguous int8 loads per
    # channel) into one register, each of its bytes then repeated across a vector (dup lane)
    xv = sch.get_sblock("x_lanes")
    b, g, yy, zz, byte, p, lane = sch.get_loops(xv)
    zo, zi = sch.split(zz, [None, LANES])
    sch.reorder(zo, byte, p, zi)
    rows = sch.fuse(b, g, yy)
    n, _c, h, wd = layer.data_shape
    pt, pl, pb, pr = layer.padding
    lane_vectors = n * layer.groups * (h + pt + pb) * _round_up(wd + pl + pr, LANES) * conv_blocking(layer)[0] * int(layer.act_bits)
    _parallel_tasks(sch, rows, n * layer.groups * (h + pt + pb), lane_vectors * PACK_BIT_PRODUCTS_PER_VECTOR)
    sch.unroll(zi)
    sch.vectorize(lane)
    xp = sch.get_sblock("x_planes")
    sch.compute_at(xp, p)
    sch.set_scope(xp, 0, "local")
    sch.vectorize(sch.get_loops(xp)[-1])


def _unroll_serial_below(sch, block, anchor, keep) -> None:
    """Unroll the serial loops of ``block`` under ``anchor``, except those in ``keep``."""
    from tvm import tirx

    loops = sch.get_loops(block)
    anchor_var = sch.get(anchor).loop_var
    start = next(i for i, loop in enumerate(loops) if sch.get(loop).loop_var.same_as(anchor_var)) + 1
    kept = [sch.get(loop).loop_var for loop in keep]
    for loop in loops[start:]:
        node = sch.get(loop)
        if node.kind == tirx.ForKind.SERIAL and not any(node.loop_var.same_as(k) for k in kept):
            sch.unroll(loop)


MIN_TASK_BIT_PRODUCTS = 1 << 21  # ~100k instructions: a task pays a workspace allocation (~2k)
# activation packing, in the same unit: ~4 instructions per lane vector written, at the ~20 bit
# products per instruction MIN_TASK_BIT_PRODUCTS assumes
PACK_BIT_PRODUCTS_PER_VECTOR = 80


def _bit_products(layer: IntLayer) -> int:
    """AND-ed bit pairs of the whole layer: outputs × reduction × activation × weight planes."""
    out = int(np.prod(conv_output_shape(layer))) if layer.op == "conv2d" else layer.data_shape[0] * layer.weight_shape[0]
    reduction = int(np.prod(layer.weight_shape[1:]))
    return out * reduction * int(layer.act_bits) * _weight_planes(layer.code_set)


def _parallel_tasks(sch, loop, extent: int, work: int) -> None:
    """Parallel over ``loop`` in as many tasks as the work pays for: each task of a TVM parallel
    loop allocates its register tiles from the workspace (a malloc), which on a small layer
    costs more than the threads save (the 512→256 dense: 2.2× the instructions)."""
    tasks = min(extent, work // MIN_TASK_BIT_PRODUCTS)
    if tasks <= 1:
        return
    outer, _ = sch.split(loop, [tasks, None])
    sch.parallel(outer)


def _reorder_present(sch, loops: dict, order: list[str]) -> None:
    present = [loops[a] for a in order if a in loops]
    if len(present) > 1:
        sch.reorder(*present)


def _vectorize_inner(sch, blocks, vectorizable: bool) -> None:
    if not vectorizable:
        return
    for block in blocks:
        sch.vectorize(sch.get_loops(block)[-1])


def schedule(sch, layer: IntLayer, features: frozenset[str]) -> None:
    """Pack activation planes, then per 16 output rows/channels (and output pixel for conv)
    run the AND + popcount reduction in uint8 register blocks."""
    _schedule(sch, layer)


def tuning_space(layer: IntLayer, features: frozenset[str]):
    vectors = -(-layer.weight_shape[0] // LANES) if layer.op == "conv2d" else 1
    choices = [c for c in (1, 2, 4) if vectors % c == 0]

    def space(sch) -> None:
        pick = choices[0] if len(choices) == 1 else sch.sample_categorical(choices, [1 / len(choices)] * len(choices))
        _schedule(sch, layer, vectors=pick)

    return space


BITSERIAL = register_kernel(
    IntKernel(
        name="bitserial",
        supports=supports,
        pack=pack,
        prim_func=prim_func,
        schedule=schedule,
        tuning_space=tuning_space,
        description="binary/ternary weights × k-bit activation planes, AND + uint8 popcount (any CPU)",
    )
)

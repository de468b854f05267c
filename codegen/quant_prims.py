"""The two float ↔ integer PrimFuncs around every integer kernel, written as flat vector loops:

* :func:`quantize_prim_func` — ``x_q = int8(clip(rint(x · inv), lo, hi))``
  (``quant_reference.quantize_activation``), the layer input to activation codes;
* :func:`epilogue_prim_func` — ``y = float32((acc + bias_q[c]) [max 0]) · scale[c]``
  (``quant_reference.epilogue``), the int32 accumulators back to float.

Why not TE + the generic schedule: that fuses the whole loop nest into one loop and splits
it by the vector width, so every lane's channel index becomes ``(4·i + lane) // (H·W)``; the
vectorizer turns that into per-lane divisions and scalar gathers of ``bias[c]``, and these
two functions cost as many instructions as the ResNet-20 conv kernel itself on ARM. Here
the buffers are read through flat 1-D views: the quantize is one contiguous loop, the
epilogue one contiguous loop per (image, channel) row with the channel's bias and scale
broadcast (or, when the channel axis is last, as for a dense layer, one row per sample with
bias/scale loaded as vectors). Each loop runs ``UNROLL`` vectors of ``lanes`` an iteration,
then single vectors and a scalar tail, so no lane needs an index division.

Rounding: ``rint`` is ``frintn``/``frinti`` on aarch64 and ``vroundps`` on x86, but armv7
NEON has no vector rounding instruction and LLVM calls ``nearbyintf`` per element; there the
value is clipped first and rounded by adding 1.5·2²³ (float32 sums in [2²³, 2²⁴) have a unit
ulp, so the add rounds half to even) and reading the integer off the sum's bits,
``bits(v + M) − bits(M)``. Exact, because |v| ≤ 128 after the clip and ``rint`` commutes
with a clip to integer bounds; and TVM's fast-math cannot fold the add away, as it could
``(v + M) − M``.
"""

from __future__ import annotations

import math

__all__ = ["MAGIC_BITS", "MAGIC_ROUND", "abs_max_prim_func", "epilogue_prim_func", "epilogue_value", "quantize_prim_func", "quantize_value",
           "rounds_in_vector"]

MAGIC_ROUND = 12582912.0  # 1.5·2²³: float32 sums in [2²³, 2²⁴) have a unit ulp
MAGIC_BITS = 0x4B400000  # the float32 bits of MAGIC_ROUND
# from this many elements on, loops run parallel over rows (cpu_schedule.GenericKnobs too)
MIN_PARALLEL_ELEMS = 16384
# vectors per iteration of the quantize and epilogue loops: one iteration's loop overhead
# (index add, compare, branch) and narrowing shuffles shared by 4 vectors, not paid per vector
UNROLL = 4


def rounds_in_vector(target) -> bool:
    """Whether LLVM has a vector round-half-even for ``target`` (a lastbit Target, a TVM target
    or a triple): every aarch64 and x86 target; not 32-bit ARM (``vrint*`` is ARMv8 only)."""
    from lastbit.codegen.cpu_schedule import _as_tvm_target

    triple = str(_as_tvm_target(target).attrs.get("mtriple", "") or "")
    return not triple.startswith(("arm", "thumb"))


def vector_loop(extent: int, lanes: int, body, name: str, unroll: int = 1):
    """``for i in range(extent): body(i)`` as a vectorized loop ``lanes``·``unroll`` wide (LLVM
    splits it into ``unroll`` registers per iteration), then one ``lanes`` wide for what is
    left, then a scalar tail (each part left out when empty)."""
    from tvm import tirx

    parts = []
    done = 0
    for width in dict.fromkeys((lanes * unroll, lanes)):
        full = (extent - done) // width if width > 1 else 0
        if full:
            outer = tirx.Var(f"{name}_o{width}", "int32")
            inner = tirx.Var(f"{name}_v{width}", "int32")
            vec = tirx.For(inner, 0, width, tirx.ForKind.VECTORIZED, body(done + outer * width + inner))
            parts.append(tirx.For(outer, 0, full, tirx.ForKind.SERIAL, vec) if full > 1
                         else tirx.For(inner, 0, width, tirx.ForKind.VECTORIZED, body(done + inner)))
            done += full * width
    tail = extent - done
    if tail:
        t = tirx.Var(f"{name}_t", "int32")
        parts.append(tirx.For(t, 0, tail, tirx.ForKind.SERIAL, body(done + t)))
    return tirx.SeqStmt(parts) if len(parts) > 1 else parts[0]


def flat_view(buffer, name: str):
    """A 1-D view of ``buffer``'s memory and the buffer (declared together by flat_prim_func)."""
    from tvm import tirx

    size = int(math.prod(int(d) for d in buffer.shape))
    return tirx.decl_buffer((size,), buffer.dtype, name=name), buffer


def flat_prim_func(buffers, views, body, scratch=()):
    """A scheduled PrimFunc of ``buffers`` (its parameters, in order) whose ``body`` reads
    them through ``views`` (:func:`flat_view` pairs); ``scratch``: buffers it allocates."""
    from tvm import tirx

    # a flat view is a DeclBuffer statement ahead of the loops that use it (TVM 0.27 form)
    body = tirx.SeqStmt([*(tirx.DeclBuffer(view, data=source.data) for view, source in views), body])
    # Relax's op-pattern analysis expects an opaque root block around the body
    from tvm import s_tir

    body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body, alloc_buffers=list(scratch)))
    func = tirx.PrimFunc(list(buffers), body)  # TVM 0.27: a buffer is a Var of BufferType
    return func.with_attr("tirx.noalias", True).with_attr("tirx.is_scheduled", True)


def quantize_value(x, factor, lo: int, hi: int, vector_round: bool = True, relu: bool = False):
    """The int8 code of one float32 value ``x`` (a TIR expression, from a buffer or a TE
    tensor): ``int8(clip(rint([max(x, 0)] · factor), lo, hi))``, ``factor`` the float32
    reciprocal scale. ``vector_round`` False: the clip-then-1.5·2²³ rounding (armv7). Every
    quantize of the integer path (this file's and the fused kernels') is this expression,
    so they round alike."""
    from tvm import tirx

    from lastbit.codegen.cpu_schedule import vectorizable_nearbyint

    vectorizable_nearbyint()
    f32 = "float32"
    lo_f, hi_f = tirx.const(float(lo), f32), tirx.const(float(hi), f32)
    v = (tirx.Max(x, tirx.const(0.0, f32)) if relu else x) * factor
    if vector_round:
        return tirx.Cast("int8", tirx.Min(tirx.Max(tirx.nearbyint(v), lo_f), hi_f))
    shifted = tirx.Min(tirx.Max(v, lo_f), hi_f) + tirx.const(MAGIC_ROUND, f32)
    bits = tirx.call_intrin("int32", "tirx.reinterpret", shifted) - tirx.const(MAGIC_BITS, "int32")
    return tirx.Cast("int8", bits)


def epilogue_value(total, scale, relu: bool):
    """``float32(total [max 0]) · scale`` for one int32 ``total = acc + bias_q`` (a TIR
    expression): the epilogue of every integer layer, one IEEE multiply (nothing to contract)."""
    from tvm import tirx

    if relu:
        total = tirx.Max(total, tirx.const(0, "int32"))
    return tirx.Cast("float32", total) * scale


def quantize_prim_func(shape: tuple[int, ...], lo: int, hi: int, inv: float | None, lanes: int,
                       vector_round: bool = True, parallel_min: int = MIN_PARALLEL_ELEMS, relu: bool = False):
    """``x_q = int8(clip(rint(x · inv), lo, hi))`` over a float32 tensor of ``shape``. ``inv``
    is the compile-time reciprocal scale, or None for a runtime one (a float32 ``()`` tensor,
    the second parameter). ``vector_round`` False: the clip-then-1.5·2²³ rounding (armv7).
    ``relu``: quantize ``max(x, 0)`` (the ReLU before the layer, folded in).
    One flat loop; from ``parallel_min`` elements on, parallel rows of the trailing dims."""
    from tvm import tirx

    shape = tuple(int(d) for d in shape)
    x = tirx.decl_buffer(shape, "float32", name="x")
    out = tirx.decl_buffer(shape, "int8", name="x_q")
    inv_buf = None if inv is not None else tirx.decl_buffer((), "float32", name="inv")
    views = [flat_view(x, "x_flat"), flat_view(out, "x_q_flat")]
    (xf, _), (of, _) = views

    def body(i):
        factor = tirx.const(float(inv), "float32") if inv is not None else tirx.BufferLoad(inv_buf, [])
        return tirx.BufferStore(of, quantize_value(tirx.BufferLoad(xf, [i]), factor, lo, hi, vector_round, relu), [i])

    total = int(math.prod(shape))
    rows = int(math.prod(shape[:2])) if len(shape) > 2 else (shape[0] if len(shape) == 2 else 1)
    if total < parallel_min or rows < 2:
        loop = vector_loop(total, lanes, body, "i", UNROLL)
    else:
        row, inner = tirx.Var("row", "int32"), total // rows
        per_row = vector_loop(inner, lanes, lambda j: body(row * inner + j), "i", UNROLL)
        loop = tirx.For(row, 0, rows, tirx.ForKind.PARALLEL, per_row)
    buffers = [x] + ([inv_buf] if inv_buf is not None else []) + [out]
    return flat_prim_func(buffers, views, loop)


def abs_max_prim_func(shape: tuple[int, ...], lanes: int):
    """``max|x|`` of a float32 tensor of ``shape`` into a float32 ``()`` (the peak behind a
    dynamic activation scale, ``quant_reference.activation_scale``): ``lanes`` running maxima
    in one vector over the flat tensor, then those lanes and the scalar tail. Legalized
    ``max(abs(x))`` is a scalar loop (the generic schedule has no spatial axis to vectorize),
    which took longer than the next layer's int8 conv. Serial: the tensor was just written
    by the previous layer and is in cache, one core streams it faster than a parallel
    launch costs. Exact: max is associative, and |x| ≥ 0, so starting from 0 changes
    nothing for a non-empty tensor."""
    from tvm import tirx

    shape = tuple(int(d) for d in shape)
    total = int(math.prod(shape))
    x = tirx.decl_buffer(shape, "float32", name="x")
    peak = tirx.decl_buffer((), "float32", name="peak")
    running = tirx.decl_buffer((lanes,), "float32", name="running", scope="local")
    views = [flat_view(x, "x_flat")]
    ((xf, _),) = views
    zero = tirx.const(0.0, "float32")
    full = total // lanes

    def lane_loop(name, body):
        v = tirx.Var(name, "int32")
        return tirx.For(v, 0, lanes, tirx.ForKind.VECTORIZED, body(v))

    i = tirx.Var("i", "int32")
    stmts = [lane_loop("v0", lambda v: tirx.BufferStore(running, zero, [v]))]
    if full:
        step = lane_loop("v", lambda v: tirx.BufferStore(
            running, tirx.Max(tirx.BufferLoad(running, [v]), tirx.abs(tirx.BufferLoad(xf, [i * lanes + v]))), [v]))
        stmts.append(tirx.For(i, 0, full, tirx.ForKind.SERIAL, step))
    stmts.append(tirx.BufferStore(peak, zero, []))
    r = tirx.Var("r", "int32")
    stmts.append(tirx.For(r, 0, lanes, tirx.ForKind.SERIAL, tirx.BufferStore(
        peak, tirx.Max(tirx.BufferLoad(peak, []), tirx.BufferLoad(running, [r])), [])))
    if total - full * lanes:
        t = tirx.Var("t", "int32")
        stmts.append(tirx.For(t, 0, total - full * lanes, tirx.ForKind.SERIAL, tirx.BufferStore(
            peak, tirx.Max(tirx.BufferLoad(peak, []), tirx.abs(tirx.BufferLoad(xf, [full * lanes + t]))), [])))
    return flat_prim_func([x, peak], views, tirx.SeqStmt(stmts), scratch=[running])


def epilogue_prim_func(acc_shape: tuple[int, ...], channel_axis: int, relu: bool, lanes: int = 4,
                       parallel_min: int = MIN_PARALLEL_ELEMS):
    """``float32((acc + bias_q[c]) [max 0]) · scale[c]`` over int32 ``acc`` of ``acc_shape``
    with channels on ``channel_axis`` (``quant_reference.epilogue``); rows run in parallel
    when the tensor has at least ``parallel_min`` elements."""
    from tvm import tirx

    acc_shape = tuple(int(d) for d in acc_shape)
    axis = channel_axis % len(acc_shape)
    outer = int(math.prod(acc_shape[:axis]))
    channels = acc_shape[axis]
    inner = int(math.prod(acc_shape[axis + 1:]))
    acc = tirx.decl_buffer(acc_shape, "int32", name="acc")
    bias = tirx.decl_buffer((channels,), "int32", name="bias_q")
    scale = tirx.decl_buffer((channels,), "float32", name="scale")
    out = tirx.decl_buffer(acc_shape, "float32", name="epilogue")
    views = [flat_view(acc, "acc_flat"), flat_view(out, "epilogue_flat")]
    (af, _), (of, _) = views

    def value(i, c):
        total = tirx.BufferLoad(af, [i]) + tirx.BufferLoad(bias, [c])
        return tirx.BufferStore(of, epilogue_value(total, tirx.BufferLoad(scale, [c]), relu), [i])

    row = tirx.Var("row", "int32")
    if inner == 1:  # channels innermost (dense [M, N]): one row per sample, bias/scale as vectors
        rows, row_body = outer, vector_loop(channels, lanes, lambda c: value(row * channels + c, c), "c", UNROLL)
    else:  # one row per (sample, channel): bias/scale broadcast along the contiguous spatial run
        c = tirx.floormod(row, channels) if outer > 1 else row
        rows, row_body = outer * channels, vector_loop(inner, lanes, lambda s: value(row * inner + s, c), "s", UNROLL)
    kind = tirx.ForKind.PARALLEL if rows > 1 and outer * channels * inner >= parallel_min else tirx.ForKind.SERIAL
    loop = tirx.For(row, 0, rows, kind, row_body)
    return flat_prim_func([acc, bias, scale, out], views, loop)

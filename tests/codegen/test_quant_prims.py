"""The activation quantize and the float epilogue around every integer kernel
(codegen/quant_prims.py): bit-exact against quant_reference on odd shapes (vector tails,
channels last), ties, values past the clip and a runtime scale — natively, with both
roundings (nearbyint and armv7's 1.5·2²³ trick), and under qemu on aarch64 and armv7 —
and actually vectorized on NEON (the point of writing them by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from lastbit.codegen import quant_reference as qr
from lastbit.codegen.cpu_schedule import cpu_info
from lastbit.codegen.quant_prims import epilogue_prim_func, quantize_prim_func, rounds_in_vector
from lastbit.targets import get_target

HOST = "x86_64-linux-gnu"
ARM = ("aarch64-linux-gnu", "armv7a-linux-gnueabihf")

# (shape, act bits, unsigned, scale, runtime scale, ReLU folded in)
QUANTIZE = [
    ((1, 5, 7, 3), 8, False, 0.05, False, False),  # 105 elements: a scalar tail at any vector width
    ((2, 3, 4, 4), 8, False, 1.0, True, False),  # scale 1: the ties below hit exactly .5
    ((3, 37), 2, True, 0.5, False, True),
    ((2, 19), 3, False, 0.25, True, False),
    ((1, 4, 7, 7), 8, False, 1.0, False, True),
    ((2, 8, 33, 33), 8, False, 0.02, False, False),  # ≥ 16384 elements: parallel rows
]
# (acc shape, channel axis, relu)
EPILOGUE = [((2, 5, 3, 3), 1, True), ((3, 37), 1, False), ((1, 4, 7, 7), 1, True), ((1, 6, 5, 4), 1, False),
            ((2, 8, 33, 33), 1, True)]  # the last runs its rows in parallel
TIES = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 127.5, -127.5, 128.0, -129.0, 1e30, -1e30], np.float32)


def _quantize_input(rng, shape, scale):
    x = (rng.standard_normal(shape) * 60 * scale).astype(np.float32)
    flat = x.reshape(-1)
    n = min(flat.size, TIES.size)
    flat[:n] = TIES[:n] * np.float32(scale)
    return x


def _cases(seed: int = 0):
    """(kind, PrimFunc args, input, constants, expected, ReLU folded in) per case."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, bits, unsigned, scale, runtime, relu in QUANTIZE:
        x = _quantize_input(rng, shape, scale)
        inv = np.float32(1.0 / float(np.float32(scale)))
        lo, hi = qr.activation_range(bits, unsigned)
        consts = [np.array(inv, np.float32)] if runtime else []
        expected = qr.quantize_activation(np.maximum(x, np.float32(0)) if relu else x, scale, bits, unsigned)
        out.append(("quantize", (shape, lo, hi, None if runtime else float(inv)), x, consts, expected, relu))
    for shape, axis, relu in EPILOGUE:
        channels = shape[axis]
        acc = rng.integers(-(1 << 20), 1 << 20, size=shape, dtype=np.int32)
        bias = rng.integers(-5000, 5000, size=channels, dtype=np.int32)
        scale = rng.uniform(1e-5, 1e-2, size=channels).astype(np.float32)
        out.append(("epilogue", (shape, axis, relu), acc, [bias, scale], qr.epilogue(acc, bias, scale, relu, axis),
                    False))
    return out


def _module(cases, lanes: int, vector_round: bool):
    """A Relax module running every case through call_tir (constants as relax constants)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x_{i}", relax.TensorType(case[2].shape, str(case[2].dtype))) for i, case in enumerate(cases)]
    with bb.function("main", params):
        with bb.dataflow():
            outs = []
            for i, ((kind, args, _, consts, expected, relu), x) in enumerate(zip(cases, params)):
                if kind == "quantize":
                    func = quantize_prim_func(*args, lanes=lanes, vector_round=vector_round, relu=relu)
                else:
                    func = epilogue_prim_func(*args, lanes=lanes)
                gv = bb.add_func(func, f"{kind}_{i}")
                operands = [x, *(relax.const(c) for c in consts)]
                outs.append(bb.emit(relax.call_tir(gv, relax.Tuple(operands),
                                                   out_ty=relax.TensorType(expected.shape, str(expected.dtype)))))
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    return bb.get()


def _check(cases, outs) -> None:
    for (kind, args, _, _, expected, _), got in zip(cases, outs):
        assert got.dtype == expected.dtype, (kind, args)
        bad = int(np.count_nonzero(got != expected))
        assert bad == 0, f"{kind} {args}: {bad} of {expected.size} values differ"


@pytest.mark.parametrize("vector_round", [True, False], ids=["nearbyint", "magic-round"])
@pytest.mark.parametrize("lanes", [4, 16])
def test_bit_exact_natively(lanes, vector_round):
    import tvm
    from tvm import relax

    cases = _cases()
    vm = relax.VirtualMachine(tvm.compile(_module(cases, lanes, vector_round), get_target(HOST).tvm()), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(case[2]) for case in cases])
    _check(cases, [result[i].numpy() for i in range(len(cases))])


def test_only_32_bit_arm_rounds_by_hand():
    assert rounds_in_vector(HOST) and rounds_in_vector("aarch64-linux-gnu")
    assert rounds_in_vector("aarch64-dotprod-linux-gnu")
    assert not rounds_in_vector("armv7a-linux-gnueabihf")


@pytest.mark.parametrize("triple", ARM)
def test_neon_code_is_vectorized(triple):
    """The loops compile to 4-lane NEON arithmetic: the float → int conversions, the multiply
    and the ReLU, not one scalar per element, and armv7 never calls nearbyintf."""
    import tvm

    target = get_target(triple)
    lanes = cpu_info(target).lanes
    quantize = quantize_prim_func((1, 32, 14, 14), -127, 127, 32.4, lanes, rounds_in_vector(target))
    epilogue = epilogue_prim_func((1, 32, 14, 14), 1, True, lanes)
    asm = {name: tvm.tirx.build(f.with_attr("global_symbol", name), target=target.tvm()).inspect_source("asm")
           for name, f in (("q", quantize), ("e", epilogue))}
    if triple.startswith("aarch64"):
        assert "fmul\tv" in asm["q"] and "fcvtzs\tv" in asm["q"] and "frint" in asm["q"]
        assert "smax\tv" in asm["e"] and "cvtf\tv" in asm["e"] and "fmul\tv" in asm["e"]
    else:
        assert "vmul.f32\tq" in asm["q"] and "vadd.f32\tq" in asm["q"] and "nearbyint" not in asm["q"]
        assert "vmax.s32\tq" in asm["e"] and "vcvt.f32." in asm["e"] and "vmul.f32\tq" in asm["e"]


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM)
def test_bit_exact_under_qemu(triple, tmp_path):
    from lastbit.codegen.bundle import build_bundle, run_bundle

    target = get_target(triple)
    missing = target.missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    cases = _cases(seed=1)
    mod = _module(cases, cpu_info(target).lanes, rounds_in_vector(target))
    bundle = build_bundle(mod, target, tmp_path / triple)
    _check(cases, run_bundle(bundle, [case[2] for case in cases], timeout_s=600))


@pytest.mark.parametrize("shape", [(1, 64, 14, 14), (1, 3, 5, 7), (2, 9), (1, 1, 1, 1)])
def test_abs_max_is_the_peak_the_dynamic_scale_needs(shape):
    """max|x| over whole vectors and the scalar tail, with the peak placed in each part."""
    import tvm

    from lastbit.codegen.quant_prims import abs_max_prim_func

    host = get_target("x86_64-linux-gnu")
    func = abs_max_prim_func(shape, cpu_info(host).lanes).with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=host.tvm())
    rng = np.random.default_rng(len(shape))
    for where in (0, -1, None):  # first element, the tail's last, wherever it falls
        x = rng.standard_normal(shape).astype(np.float32)
        if where is not None:
            x.flat[where] = -50.0  # a negative peak: the abs matters
        peak = tvm.runtime.tensor(np.zeros((), np.float32))
        lib["main"](tvm.runtime.tensor(x), peak)
        assert peak.numpy() == np.abs(x).max() and qr.activation_scale(x) == np.maximum(
            peak.numpy() / np.float32(127), np.finfo(np.float32).tiny)

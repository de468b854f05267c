"""Integer kernels (codegen/kernels): packing round trips, what each kernel serves, and every
kernel bit-exact against quant_reference on random shapes — natively on x86 and under
qemu-user for aarch64 and armv7.

Building is the slow part, so each test compiles all its cases into one module (a bundle with
one call_tir per case) instead of one library per case.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lastbit.codegen.kernels import (
    IntLayer,
    KernelError,
    bitserial,
    get_kernel,
    list_kernels,
    lut,
    shift_add,
)
from lastbit.codegen.quant_reference import int_conv2d, int_dense
from lastbit.passes.pow2_projection import code_set
from lastbit.targets import get_target

HOST = "x86_64-linux-gnu"
ARM = ("aarch64-linux-gnu", "armv7a-linux-gnueabihf")


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def _dense_case(rng, kernel: str, cs: str, m: int, n: int, k: int, act_bits: int = 8):
    levels = code_set(cs).levels
    codes = rng.choice(levels, size=(n, k)).astype(np.int8)
    lo, hi = -(1 << (act_bits - 1)), (1 << (act_bits - 1))
    x = rng.integers(lo, hi, size=(m, k), dtype=np.int8)
    layer = IntLayer("dense", cs, code_set(cs).bits, (m, k), (n, k), act_bits=act_bits)
    return get_kernel(kernel), layer, codes, x, int_dense(x, codes)


def _conv_case(rng, kernel: str, cs: str, shape, out_c: int, ksize, stride, padding, dilation=(1, 1), groups=1):
    _n, c, _h, _w = shape
    levels = code_set(cs).levels
    codes = rng.choice(levels, size=(out_c, c // groups, *ksize)).astype(np.int8)
    x = rng.integers(-128, 128, size=shape, dtype=np.int8)
    layer = IntLayer(
        "conv2d", cs, code_set(cs).bits, shape, codes.shape,
        strides=stride, padding=padding, dilation=dilation, groups=groups,
    )
    pt, pl, pb, pr = padding
    x_pad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ref = int_conv2d(x_pad, codes, stride, 0, dilation, groups)
    return get_kernel(kernel), layer, codes, x, ref


def _extreme_dense(kernel: str, cs: str, m: int = 2, n: int = 20, k: int = 300):
    """The worst case for every narrow intermediate: x = −128 and the largest code everywhere."""
    levels = code_set(cs).levels
    codes = np.full((n, k), levels.min(), np.int8)
    codes[1::2] = levels.max()
    x = np.full((m, k), -128, np.int8)
    layer = IntLayer("dense", cs, code_set(cs).bits, (m, k), (n, k))
    return get_kernel(kernel), layer, codes, x, int_dense(x, codes)


def _random_dense(rng, kernel, cs, **fixed):
    """Odd sizes on purpose: K not a multiple of any word or block, N not of any panel."""
    m = fixed.get("m", int(rng.integers(1, 5)))
    n = int(rng.integers(3, 70))
    k = int(rng.integers(5, 200))
    return _dense_case(rng, kernel, cs, m, n, k, fixed.get("act_bits", 8))


def _conv_cases(rng, kernel, cs):
    return [
        _conv_case(rng, kernel, cs, (1, 3, 9, 11), 5, (3, 3), (1, 1), (1, 1, 1, 1)),
        _conv_case(rng, kernel, cs, (2, 4, 8, 7), 6, (3, 2), (2, 2), (0, 1, 1, 0), groups=2),
        _conv_case(rng, kernel, cs, (1, 8, 7, 7), 8, (3, 3), (1, 1), (2, 2, 2, 2), dilation=(2, 2), groups=8),
    ]


def _run_cases(cases, triple: str, tmp_path) -> None:
    from lastbit.codegen.bundle import build_bundle, run_bundle
    from lastbit.codegen.kernels.common import kernels_module

    target = get_target(triple)
    mod = kernels_module([(k, layer, codes) for k, layer, codes, _, _ in cases], target.feature_set())
    bundle = build_bundle(mod, target, tmp_path / f"kernels-{triple}")
    outs = run_bundle(bundle, [x for _, _, _, x, _ in cases], timeout_s=600)
    for (kernel, layer, _, _, ref), out in zip(cases, outs):
        assert out.dtype == np.int32
        mismatch = int(np.count_nonzero(out != ref))
        assert mismatch == 0, f"{kernel.name} {layer}: {mismatch} of {ref.size} accumulators differ"


def _has(features):
    return set(features) <= get_target(HOST).feature_set()


def _tuned(kernel, seed: int):
    """The kernel with its default schedule replaced by one sample of its tuning space."""

    def schedule(sch, layer, features):
        sch.seed(seed)
        kernel.tuning_space(layer, features)(sch)

    return dataclasses.replace(kernel, schedule=schedule)


# --------------------------------------------------------------------------------------------
# bit-exact on x86 (one build for all cases)
# --------------------------------------------------------------------------------------------


def test_every_kernel_is_bit_exact_on_x86(tmp_path):
    rng = np.random.default_rng(20261123)
    cases = []
    for cs in ("ternary", "pow2-4", "pow2-64"):
        cases.append(_random_dense(rng, "shift-add", cs))
    for cs in ("binary", "ternary"):
        cases.append(_random_dense(rng, "bitserial", cs))
    cases.append(_random_dense(rng, "bitserial", "ternary", act_bits=4))
    cases.append(_random_dense(rng, "int8", "int8"))
    cases.append(_dense_case(rng, "int8", "pow2-4", 2, 48, 96))  # vectorized panels (N % 16 == 0)
    cases.append(_dense_case(rng, "shift-add", "pow2-4", 1, 32, 77))
    cases.append(_dense_case(rng, "bitserial", "ternary", 2, 16, 130))
    for kernel, cs in (("shift-add", "pow2-8"), ("int8", "int8"), ("bitserial", "binary")):
        cases += _conv_cases(rng, kernel, cs)
    cases += [_extreme_dense(name, cs) for name, cs in
              (("shift-add", "pow2-64"), ("int8", "int8"), ("bitserial", "binary"), ("bitserial", "ternary"))]
    if _has(("avx512bw", "avx512vnni")):
        for cs in ("binary", "ternary", "pow2-4", "pow2-64"):
            cases.append(_random_dense(rng, "lut", cs))
        cases.append(_random_dense(rng, "lut", "pow2-4", m=1))
        cases.append(_dense_case(rng, "lut", "pow2-4", 8, 64, 256))  # full tiles, k chunks
        cases.append(_conv_cases(rng, "lut", "pow2-4")[0])  # conv2d as an im2col GEMM (groups=1)
        cases.append(_conv_case(rng, "lut", "ternary", (2, 5, 9, 8), 20, (3, 3), (2, 1), (0, 1, 2, 1), dilation=(1, 2)))
        cases.append(_random_dense(rng, "int8-vnni", "int8"))
        cases.append(_dense_case(rng, "int8-vnni", "int8", 1, 64, 256))
        cases += [_extreme_dense("lut", "pow2-64"), _extreme_dense("lut", "binary", m=1), _extreme_dense("int8-vnni", "int8")]
    _run_cases(cases, HOST, tmp_path)


def test_sampled_tuning_schedules_stay_bit_exact(tmp_path):
    """A tuner may pick any point of a kernel's space: a few samples must all compute the same."""
    rng = np.random.default_rng(7)
    cases = []
    names = ["shift-add", "bitserial", "int8"] + (["lut", "int8-vnni"] if _has(("avx512bw", "avx512vnni")) else [])
    for seed, name in enumerate(names):
        cs = {"bitserial": "ternary", "int8": "int8", "int8-vnni": "int8"}.get(name, "pow2-4")
        kernel, layer, codes, x, ref = _dense_case(rng, name, cs, 4, 64, 256)
        cases.append((_tuned(kernel, seed), layer, codes, x, ref))
    kernel, layer, codes, x, ref = _conv_cases(rng, "int8", "int8")[0]
    cases.append((_tuned(kernel, 3), layer, codes, x, ref))
    _run_cases(cases, HOST, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM)
def test_portable_kernels_are_bit_exact_under_qemu(triple, tmp_path):
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    rng = np.random.default_rng(len(triple))  # fixed per target: a failure reproduces
    cases = [
        _random_dense(rng, "shift-add", "pow2-4"),
        _random_dense(rng, "bitserial", "ternary"),
        _random_dense(rng, "bitserial", "binary"),
        _random_dense(rng, "int8", "int8"),
        _dense_case(rng, "int8", "pow2-4", 1, 32, 64),
        _conv_cases(rng, "shift-add", "pow2-4")[1],
        _conv_cases(rng, "bitserial", "ternary")[0],
        _conv_cases(rng, "int8", "int8")[2],
    ]
    lut_neon = "lut-neon" if triple.startswith("aarch64") else "lut-neon-v7"
    cases += [
        _random_dense(rng, lut_neon, "pow2-4", m=1),
        _random_dense(rng, lut_neon, "ternary"),
        _dense_case(rng, lut_neon, "pow2-2", 3, 32, 300),  # several int16 partial-sum chunks
        _conv_cases(rng, lut_neon, "pow2-4")[0],
    ]
    cases += [_extreme_dense(lut_neon, "pow2-4"), _extreme_dense("shift-add", "pow2-64"), _extreme_dense("int8", "int8")]
    if triple.startswith("aarch64"):  # 15 levels: the 16-entry tbl, int32 partial sums
        cases += [_random_dense(rng, lut_neon, "pow2-64"), _extreme_dense(lut_neon, "pow2-64")]
    _run_cases(cases, triple, tmp_path)


# --------------------------------------------------------------------------------------------
# what each kernel serves
# --------------------------------------------------------------------------------------------

AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni", "avx512vpopcntdq"})
NEON = frozenset({"neon", "popcount"})


def _layer(op="dense", cs="pow2-4"):
    if op == "dense":
        return IntLayer("dense", cs, code_set(cs).bits, (1, 64), (32, 64))
    return IntLayer("conv2d", cs, code_set(cs).bits, (1, 8, 8, 8), (8, 8, 3, 3), padding=(1, 1, 1, 1))


@pytest.mark.parametrize(
    "kernel, layer, features, reason",
    [
        ("lut", _layer(), AVX512, None),
        ("lut", _layer(), NEON, "avx512"),
        ("lut", _layer("conv2d"), AVX512, None),
        ("lut", dataclasses.replace(_layer("conv2d"), groups=2, weight_shape=(8, 4, 3, 3)), AVX512, "groups=2"),
        ("lut", _layer(cs="int8"), AVX512, "levels"),
        ("int8-vnni", _layer(cs="int8"), AVX512 - {"avx512vnni"}, "avx512vnni"),
        ("shift-add", _layer("conv2d"), NEON, None),
        ("shift-add", _layer(cs="int8"), NEON, "not a power-of-two"),
        ("bitserial", _layer(cs="ternary"), NEON, None),
        ("bitserial", _layer(cs="pow2-4"), AVX512, "1–2 bit"),
        ("int8", _layer("conv2d", cs="pow2-64"), frozenset(), None),
        ("lut-neon", _layer("conv2d"), NEON | {"aarch64"}, None),
        ("lut-neon", _layer(), NEON | {"armv7"}, "aarch64"),
        ("lut-neon-v7", _layer(cs="pow2-64"), NEON | {"armv7"}, "levels"),
        ("lut-neon-v7", _layer(), AVX512, "neon"),
    ],
)
def test_supports_names_the_reason(kernel, layer, features, reason):
    got = get_kernel(kernel).supports(layer, features)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_registry_lists_every_family():
    ours = {"lut", "lut-neon", "lut-neon-v7", "int8-vnni", "int8", "shift-add", "bitserial"}
    assert ours <= {k.name for k in list_kernels()}
    for name in ours:
        assert get_kernel(name).tuning_space is not None and get_kernel(name).description


def test_codes_outside_the_code_set_are_refused():
    codes = np.full((32, 64), 3, np.int8)  # 3 is not a power of two
    for name in ("lut", "shift-add"):
        with pytest.raises(KernelError, match="3"):
            get_kernel(name).pack(_layer(), codes)
    with pytest.raises(KernelError, match="2"):
        get_kernel("bitserial").pack(_layer(cs="ternary"), np.full((32, 64), 2, np.int8))
    with pytest.raises(KernelError, match="shape"):
        get_kernel("int8").pack(_layer(cs="int8"), np.zeros((31, 64), np.int8))


# --------------------------------------------------------------------------------------------
# packing round trips (numpy only)
# --------------------------------------------------------------------------------------------

CODE_SETS = ["binary", "ternary", "pow2-2", "pow2-4", "pow2-8", "pow2-64"]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CODE_SETS), st.integers(1, 40), st.integers(1, 100), st.integers(0, 2**31))
def test_lut_fields_round_trip(cs, n, k, seed):
    levels = code_set(cs).levels.astype(np.int32)
    idx = np.random.default_rng(seed).integers(0, len(levels), size=(n, k)).astype(np.uint8)
    bits = lut.code_bits(levels)
    packed = lut.pack_fields(idx, bits)
    assert packed.shape[2] == bits  # exactly `bits` bits per weight: no padding inside a group
    np.testing.assert_array_equal(lut.unpack_fields(packed, bits, n, k), idx)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CODE_SETS), st.integers(1, 300), st.integers(0, 2**31))
def test_shift_add_fields_round_trip(cs, size, seed):
    levels = code_set(cs).levels.astype(np.int32)
    codes = np.random.default_rng(seed).choice(levels, size=size)
    fields = shift_add.encode(codes, levels)
    assert int(fields.max()) < 1 << shift_add.field_width(levels)
    np.testing.assert_array_equal(shift_add.decode(fields, levels), codes)
    words = shift_add.pack_words(fields[None], shift_add.field_width(levels))
    per = 32 // shift_add.field_width(levels)
    assert words.shape == (1, -(-size // per))


@pytest.mark.parametrize("cs", CODE_SETS)
def test_lut_neon_int16_chunks_cannot_overflow(cs):
    from lastbit.codegen.kernels.lut_neon import GROUP, chunk_groups, partial_dtype

    levels = code_set(cs).levels.astype(np.int32)
    for groups in (1, 7, 64, 128, 1000):
        chunk = chunk_groups(levels, groups)
        assert groups % chunk == 0
        if partial_dtype(levels) == "int16":
            assert chunk * GROUP * 128 * np.abs(levels).max() <= 32767
    assert partial_dtype(levels) == ("int32" if cs == "pow2-64" else "int16")


def test_shift_add_widths_match_the_code_sets():
    widths = {cs: shift_add.field_width(code_set(cs).levels.astype(np.int32)) for cs in CODE_SETS}
    assert widths == {"binary": 2, "ternary": 2, "pow2-2": 3, "pow2-4": 3, "pow2-8": 4, "pow2-64": 4}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.sampled_from([32, 64]), st.integers(0, 2**31))
def test_bitserial_words_hold_bit_r_at_position_r(r, word, seed):
    bits = np.random.default_rng(seed).integers(0, 2, size=(3, r)).astype(np.uint8)
    words = bitserial.pack_bits(bits, word)
    for row in range(3):
        for j in np.flatnonzero(bits[row]):
            assert (int(words[row, j // word]) >> int(j % word)) & 1
        assert sum(int(w).bit_count() for w in words[row]) == bits[row].sum()


def test_bitserial_identities_match_int_dense():
    """The popcount identities of the module docstring, evaluated in numpy."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(3, 100), dtype=np.int8)
    planes = [((x.astype(np.int32) >> p) & 1) for p in range(8)]
    weight = [1 << p for p in range(7)] + [-128]
    for cs in ("binary", "ternary"):
        codes = rng.choice(code_set(cs).levels, size=(5, 100)).astype(np.int32)
        w = bitserial.weight_planes(codes, cs).astype(np.int32)  # [5, planes, 100]
        acc = np.zeros((3, 5), np.int64)
        for p in range(8):
            if cs == "binary":
                acc += weight[p] * (2 * planes[p] @ w[:, 0].T - planes[p].sum(1, keepdims=True))
            else:
                acc += weight[p] * (planes[p] @ w[:, 0].T - planes[p] @ w[:, 1].T)
        np.testing.assert_array_equal(acc, int_dense(x, codes))

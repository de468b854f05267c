"""The bitserial kernel (codegen/kernels/bitserial.py) on k-bit activations: bit-exact against
quant_reference for 1..4-bit unsigned and signed activations × binary/ternary weights on odd
shapes, natively and under qemu-user (aarch64), its packing order, and NEON ``cnt`` in the asm."""

from __future__ import annotations

import numpy as np
import pytest

from lastbit.codegen.kernels import IntLayer, bitserial, get_kernel
from lastbit.codegen.quant_reference import activation_range, int_conv2d, int_dense
from lastbit.passes.pow2_projection import code_set
from lastbit.targets import get_target

GRIDS = [(bits, unsigned) for bits in (1, 2, 3, 4) for unsigned in (True, False)]


def _activations(rng, shape, bits: int, unsigned: bool) -> np.ndarray:
    lo, hi = activation_range(bits, unsigned)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


def _code_bits(bits: int, unsigned: bool) -> int:
    return bits if unsigned else max(bits, 2)


def _cases(rng, grids, conv_shapes):
    cases = []
    for i, (bits, unsigned) in enumerate(grids):
        cs = ("binary", "ternary")[i % 2]
        levels = code_set(cs).levels
        m, n, k = int(rng.integers(1, 4)), int(rng.integers(3, 70)), int(rng.integers(5, 300))
        codes = rng.choice(levels, size=(n, k)).astype(np.int8)
        x = _activations(rng, (m, k), bits, unsigned)
        layer = IntLayer("dense", cs, 2, (m, k), (n, k), act_bits=_code_bits(bits, unsigned), act_unsigned=unsigned)
        cases.append((get_kernel("bitserial"), layer, codes, x, int_dense(x, codes)))
        shape, out_c, ksize, stride, padding, dilation, groups = conv_shapes[i % len(conv_shapes)]
        codes = rng.choice(levels, size=(out_c, shape[1] // groups, *ksize)).astype(np.int8)
        x = _activations(rng, shape, bits, unsigned)
        layer = IntLayer("conv2d", cs, 2, shape, codes.shape, strides=stride, padding=padding, dilation=dilation,
                         groups=groups, act_bits=_code_bits(bits, unsigned), act_unsigned=unsigned)
        pt, pl, pb, pr = padding
        ref = int_conv2d(np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))), codes, stride, 0, dilation, groups)
        cases.append((get_kernel("bitserial"), layer, codes, x, ref))
    return cases


CONV_SHAPES = [
    ((1, 13, 9, 8), 32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),  # 2 vectors a tile, C % 8 = 5, stride 2
    ((1, 16, 6, 7), 64, (3, 3), (1, 1), (1, 0, 1, 2), (1, 1), 2),  # 2 groups of 32: tiles inside a group
    ((1, 5, 9, 11), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # vectorized: 16 output channels
    ((2, 4, 8, 7), 6, (3, 2), (2, 2), (0, 1, 1, 0), (1, 1), 2),  # grouped, strided, odd padding
    ((1, 19, 7, 6), 33, (1, 3), (1, 1), (0, 2, 0, 1), (1, 2), 1),  # 3 channel bytes, dilation, O % 16 = 1
    ((1, 72, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # 9 bytes per row: uint8 blocks of 9
]


def _run(cases, triple, tmp_path):
    from tests.codegen.test_kernels import _run_cases

    _run_cases(cases, triple, tmp_path)


def test_bitserial_k_bit_activations_are_bit_exact_on_x86(tmp_path):
    _run(_cases(np.random.default_rng(12), GRIDS, CONV_SHAPES), "x86_64-linux-gnu", tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ["aarch64-linux-gnu", "armv7a-linux-gnueabihf"])
def test_bitserial_k_bit_activations_are_bit_exact_under_qemu(tmp_path, triple):
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    grids = [(1, True), (2, True), (2, False), (3, False), (4, True)]
    _run(_cases(np.random.default_rng(1212), grids, CONV_SHAPES), triple, tmp_path)


def _vector_tiles(rng):
    """Ternary and binary conv cases under every ``vectors`` choice of the tuning space (1, 2
    and 4 channel vectors a register tile), on odd spatial shapes."""
    import dataclasses

    cases = []
    for vectors in (1, 2, 4):
        cs = ("ternary", "binary")[vectors % 2]
        levels = code_set(cs).levels
        shape = (1, 20, 7, 9)
        codes = rng.choice(levels, size=(64, 20, 3, 3)).astype(np.int8)
        x = _activations(rng, shape, 2, True)
        layer = IntLayer("conv2d", cs, 2, shape, codes.shape, padding=(1, 1, 0, 2), act_bits=2, act_unsigned=True)
        ref = int_conv2d(np.pad(x, ((0, 0), (0, 0), (1, 0), (1, 2))), codes, (1, 1), 0, (1, 1), 1)
        kernel = dataclasses.replace(get_kernel("bitserial"),
                                     schedule=lambda sch, layer, f, v=vectors: bitserial._schedule(sch, layer, vectors=v))
        cases.append((kernel, layer, codes, x, ref))
    return cases


def test_bitserial_conv_vector_tiles_are_bit_exact_on_x86(tmp_path):
    _run(_vector_tiles(np.random.default_rng(31)), "x86_64-linux-gnu", tmp_path)


@pytest.mark.qemu
def test_bitserial_conv_vector_tiles_are_bit_exact_under_qemu(tmp_path):
    triple = "aarch64-linux-gnu"
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    _run(_vector_tiles(np.random.default_rng(32)), triple, tmp_path)


def test_ternary_conv_blocks_fit_the_int8_difference():
    """A ternary counter sums popc(x & P) − popc(x & N) ∈ [−8, 8] per byte: at most 15 bytes
    keep the int8 view exact, so a 3-wide row takes 5 channel bytes a block at most."""
    layer = IntLayer("conv2d", "ternary", 2, (1, 80, 4, 4), (16, 80, 3, 3), act_bits=2, act_unsigned=True)
    cb, cbi = bitserial.conv_blocking(layer)
    assert (cb, cbi) == (10, 5) and 3 * cbi <= bitserial.TERNARY_BLOCK_BYTES
    wide = IntLayer("conv2d", "ternary", 2, (1, 8, 4, 20), (16, 8, 1, 16), act_bits=2, act_unsigned=True)
    assert "15-byte block" in get_kernel("bitserial").supports(wide, frozenset())


def test_bitserial_uses_neon_cnt_on_uint8_lanes():
    """The hot loop is AND + ``cnt v.16b`` (LLVM lowers ctpop on i8x16 to one cnt)."""
    import tvm

    from lastbit.codegen.kernels.common import scheduled_module

    target = get_target("aarch64-linux-gnu")
    layer = IntLayer("conv2d", "ternary", 2, (1, 32, 8, 8), (32, 32, 3, 3), padding=(1, 1, 1, 1),
                     act_bits=2, act_unsigned=True)
    lib = tvm.tirx.build(scheduled_module(get_kernel("bitserial"), layer, target.feature_set()), target=target.tvm())
    asm = lib.inspect_source("asm")
    assert asm.count(".16b") > 0 and "cnt\tv" in asm
    assert "uaddlp" not in asm  # no per-word widening popcount chains


def test_plane_weights_are_twos_complement_or_unsigned():
    assert bitserial.plane_weights(3, unsigned=True) == [1, 2, 4]
    assert bitserial.plane_weights(3, unsigned=False) == [1, 2, -4]
    x = np.arange(-4, 4)
    planes = [(x >> p) & 1 for p in range(3)]
    np.testing.assert_array_equal(sum(c * b for c, b in zip(bitserial.plane_weights(3, False), planes)), x)


def test_dense_bit_order_puts_element_16j_plus_b_at_bit_j_of_byte_b():
    k = 256
    bits = np.zeros((1, k), np.uint8)
    bits[0, 128 + 16 * 5 + 3] = 1  # block 1, j = 5, b = 3
    packed = bitserial.pack_bits(bitserial.dense_bit_order(bits), 8)[0]
    assert np.flatnonzero(packed).tolist() == [16 + 3] and packed[16 + 3] == 1 << 5


def test_unsigned_8_bit_activations_are_refused():
    layer = IntLayer("dense", "ternary", 2, (1, 64), (32, 64), act_bits=8, act_unsigned=True)
    assert "7 bits" in get_kernel("bitserial").supports(layer, frozenset())

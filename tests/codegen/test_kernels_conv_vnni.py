"""``int8-vnni-conv`` (codegen/kernels/conv_vnni.py): the packed layout and compensation in
numpy, what the kernel declines, and the compiled kernel bit-exact against
``quant_reference.int_conv2d`` on random shapes (stride 1/2, asymmetric padding, dilation,
1×1/3×3/7×7, channel counts that are not multiples of 4 or 16, batch 2, extreme values).

All cases of a test are compiled into one module (a bundle with one call_tir per case), since
building is the slow part.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lastbit.codegen.kernels import IntLayer, KernelError, conv_vnni, get_kernel
from lastbit.codegen.quant_reference import int_conv2d
from lastbit.passes.pow2_projection import code_set
from lastbit.targets import get_target

HOST = "x86_64-linux-gnu"
VNNI = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512vnni"})


def _host_has_vnni() -> bool:
    return {"avx512bw", "avx512vnni"} <= get_target(HOST).feature_set()


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="host CPU lacks AVX-512 VNNI")


def _layer(data_shape, weight_shape, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1, cs="int8"):
    return IntLayer("conv2d", cs, code_set(cs).bits, tuple(data_shape), tuple(weight_shape),
                    strides=stride, padding=padding, dilation=dilation, groups=groups)


def _case(rng, data_shape, out_c, ksize, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), cs="int8"):
    """A random layer, its codes and input, and the reference accumulators."""
    c = data_shape[1]
    levels = np.asarray(code_set(cs).levels)
    codes = rng.choice(levels, size=(out_c, c, *ksize)).astype(np.int8)
    x = rng.integers(-128, 128, size=data_shape, dtype=np.int8)
    layer = _layer(data_shape, codes.shape, stride, padding, dilation, cs=cs)
    pt, pl, pb, pr = padding
    ref = int_conv2d(np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))), codes, stride, 0, dilation)
    return layer, codes, x, ref


def _run(cases, tmp_path, kernels=None) -> None:
    """Compile every (layer, codes, x, ref) case into one bundle (with the kernel of the same
    index in ``kernels``, default ours), run it, compare bit for bit."""
    from lastbit.codegen.bundle import build_bundle, run_bundle
    from lastbit.codegen.kernels.common import kernels_module

    kernels = kernels or [get_kernel(conv_vnni.NAME)] * len(cases)
    target = get_target(HOST)
    for kernel, (layer, *_) in zip(kernels, cases):
        assert kernel.supports(layer, target.feature_set()) is None, layer
    mod = kernels_module([(k, layer, codes) for k, (layer, codes, _, _) in zip(kernels, cases)], target.feature_set())
    bundle = build_bundle(mod, target, tmp_path / "conv-vnni")
    outs = run_bundle(bundle, [x for _, _, x, _ in cases], timeout_s=300)
    for (layer, _, _, ref), out in zip(cases, outs):
        assert out.dtype == np.int32 and out.shape == ref.shape
        mismatch = int(np.count_nonzero(out != ref))
        assert mismatch == 0, f"{layer}: {mismatch} of {ref.size} accumulators differ"


# --------------------------------------------------------------------------------------------
# packing (numpy, no TVM)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("o, c, kh, kw", [(16, 4, 3, 3), (20, 5, 3, 3), (3, 1, 1, 1), (33, 70, 1, 2)])
def test_weight_blocks_hold_each_code_at_its_vpdpbusd_lane(o, c, kh, kw):
    rng = np.random.default_rng(o * c)
    codes = rng.integers(-128, 128, (o, c, kh, kw)).astype(np.int8)
    blocks = conv_vnni.pack_weight_blocks(codes)
    ob, cb = -(-o // 16), -(-c // 4)
    assert blocks.shape == (ob, cb, kh, kw, 16, 4) and blocks.dtype == np.int8
    for f, ch, y, z in [(0, 0, 0, 0), (o - 1, c - 1, kh - 1, kw - 1), (o // 2, c // 2, kh // 2, kw - 1)]:
        assert blocks[f // 16, ch // 4, y, z, f % 16, ch % 4] == codes[f, ch, y, z]
    # everything beyond the real channels is zero, so it adds nothing to the dot products
    assert np.count_nonzero(blocks) == np.count_nonzero(codes)


def test_compensation_is_128_times_the_weight_sum_per_output_channel():
    codes = np.array([[[[127, 127], [127, 127]]], [[[-128, 0], [1, -1]]]], np.int8)  # [2, 1, 2, 2]
    np.testing.assert_array_equal(conv_vnni.compensation(codes), [128 * 508, 128 * -128])
    x = np.random.default_rng(1).integers(-128, 128, (1, 1, 5, 5)).astype(np.int8)
    shifted = int_conv2d(x.astype(np.int32) + 128, codes)  # what vpdpbusd accumulates
    comp = conv_vnni.compensation(codes)[None, :, None, None]
    np.testing.assert_array_equal(shifted - comp, int_conv2d(x, codes))


def test_pack_refuses_codes_outside_int8_and_wrong_shapes():
    layer = _layer((1, 4, 5, 5), (16, 4, 3, 3))
    with pytest.raises(KernelError, match="outside int8"):
        conv_vnni.pack(layer, np.full((16, 4, 3, 3), 200, np.int32))
    with pytest.raises(KernelError, match="shape"):
        conv_vnni.pack(layer, np.zeros((16, 4, 1, 1), np.int8))


# --------------------------------------------------------------------------------------------
# what it serves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, features, reason",
    [
        (_layer((1, 8, 8, 8), (8, 1, 3, 3), groups=8), VNNI, "groups=8"),
        (_layer((1, 8, 8, 8), (8, 4, 3, 3), groups=2), VNNI, "groups=2"),
        (_layer((1, 8, 8, 8), (8, 8, 3, 3)), frozenset({"avx2", "avx512f"}), "avx512bw, avx512vnni"),
        (_layer((1, 8, 8, 8), (8, 8, 3, 3)), frozenset({"neon", "popcount"}), "avx512vnni"),
        (IntLayer("dense", "int8", 8, (1, 64), (32, 64)), VNNI, "conv2d only"),
        (_layer((1, 8, 2, 2), (8, 8, 3, 3)), VNNI, "does not fit"),
        (IntLayer("conv2d", "int12", 12, (1, 8, 8, 8), (8, 8, 3, 3)), VNNI, "unknown code set"),
    ],
)
def test_supports_names_the_reason(layer, features, reason):
    why = conv_vnni.supports(layer, features)
    assert why is not None and reason in why


def test_supports_plain_convolutions_with_vnni():
    assert conv_vnni.supports(_layer((1, 3, 9, 9), (5, 3, 3, 3), padding=(1, 1, 1, 1)), VNNI) is None


@pytest.mark.parametrize("ow", [56, 28, 14, 7, 13, 112, 1])
@pytest.mark.parametrize("out_c", [16, 64, 512, 20])
def test_default_knobs_divide_their_loops_and_fit_the_registers(ow, out_c):
    layer = _layer((1, 4, 1, ow), (out_c, 4, 1, 1))
    knobs = conv_vnni.default_knobs(layer)
    assert ow % knobs.ow_tile == 0 and knobs.ow_tile <= conv_vnni.DEFAULT_OW_TILE
    assert -(-out_c // 16) % knobs.oc_blocks == 0
    assert knobs.ow_tile * knobs.oc_blocks <= conv_vnni.MAX_OW_TILE  # accumulators, plus operands ≤ 32 zmm


@needs_vnni
def test_x86_strategy_serves_resnet_convolutions_with_it():
    from lastbit.codegen.quant_lowering import kernel_candidates

    target = get_target(HOST)
    layer = _layer((1, 64, 56, 56), (64, 64, 3, 3), padding=(1, 1, 1, 1), cs="pow2-4")
    chosen = next(name for name in kernel_candidates(target, None, "conv2d")
                  if get_kernel(name).supports(layer, target.feature_set()) is None)
    assert chosen == conv_vnni.NAME


# --------------------------------------------------------------------------------------------
# bit-exact on x86
# --------------------------------------------------------------------------------------------


@needs_vnni
def test_bit_exact_on_random_shapes(tmp_path):
    rng = np.random.default_rng(20261123)
    cases = [
        _case(rng, (1, 16, 12, 12), 32, (3, 3), padding=(1, 1, 1, 1), cs="pow2-4"),  # whole blocks
        _case(rng, (1, 5, 9, 11), 7, (3, 3), padding=(1, 1, 1, 1)),  # C % 4, O % 16 != 0
        _case(rng, (2, 6, 10, 9), 20, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1), cs="ternary"),  # batch 2, stride 2
        _case(rng, (1, 3, 23, 23), 16, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3), cs="pow2-8"),  # ResNet stem
        _case(rng, (1, 12, 14, 14), 24, (1, 1), stride=(2, 2)),  # 1×1 downsample
        _case(rng, (1, 9, 8, 13), 17, (1, 1)),  # 1×1, prime row
        _case(rng, (1, 8, 9, 10), 16, (3, 2), stride=(1, 2), padding=(0, 1, 2, 1)),  # asymmetric
        _case(rng, (1, 4, 11, 11), 16, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)),  # dilation
        _case(rng, (1, 20, 7, 7), 48, (3, 3), padding=(1, 1, 1, 1), cs="binary"),  # ResNet layer-4 rows
    ]
    for _ in range(3):  # and a few fully random ones
        k = int(rng.choice([1, 3, 5]))
        c, o, hw, s = int(rng.integers(1, 24)), int(rng.integers(1, 40)), int(rng.integers(k, 17)), int(rng.integers(1, 3))
        pad = tuple(int(p) for p in rng.integers(0, k // 2 + 1, 4))
        cases.append(_case(rng, (1, c, hw, hw + 1), o, (k, k), stride=(s, s), padding=pad))
    _run(cases, tmp_path)


@needs_vnni
def test_extreme_values_are_exact(tmp_path):
    """x = −128 and ±127/−128 codes everywhere: the largest |x+128|·|w| sums the u8×s8 trick sees."""
    layer = _layer((1, 64, 6, 6), (32, 64, 3, 3), padding=(1, 1, 1, 1))
    codes = np.full(layer.weight_shape, 127, np.int8)
    codes[1::2] = -128
    x = np.full(layer.data_shape, -128, np.int8)
    x_max = np.full(layer.data_shape, 127, np.int8)
    ref = int_conv2d(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), codes)
    ref_max = int_conv2d(np.pad(x_max, ((0, 0), (0, 0), (1, 1), (1, 1))), codes)
    _run([(layer, codes, x, ref), (layer, codes, x_max, ref_max)], tmp_path)


@needs_vnni
def test_sampled_tuning_schedules_stay_bit_exact(tmp_path):
    """A tuner may pick any point of the space (tile, kw unroll): samples must all compute the same."""
    rng = np.random.default_rng(5)
    kernel = get_kernel(conv_vnni.NAME)
    cases, tuned = [], []
    for seed in range(6):
        def schedule(sch, layer, features, seed=seed):
            sch.seed(seed)
            kernel.tuning_space(layer, features)(sch)

        tuned.append(dataclasses.replace(kernel, schedule=schedule))
        cases.append(_case(rng, (1, 8, 12, 12), 64, (3, 3), stride=(1 + seed % 2,) * 2, padding=(1, 1, 1, 1)))
    _run(cases, tmp_path, kernels=tuned)


# --------------------------------------------------------------------------------------------
# fused: the layer's quantize and epilogue inside the kernel
# --------------------------------------------------------------------------------------------


def _fused_case(rng, data_shape, out_c, ksize, io_bits=(8, False), relus=(False, False), dynamic=True, **conv):
    """A random layer run whole in numpy: ``quantize_activation`` → ``int_conv2d`` →
    ``epilogue``, with the FusedIO that asks the kernel for the same."""
    from lastbit.codegen.kernels import FusedIO
    from lastbit.codegen.quant_reference import activation_range, activation_scale, epilogue, quantize_activation

    bits, unsigned = io_bits
    layer, codes, _, _ = _case(rng, data_shape, out_c, ksize, **conv)
    io = FusedIO(*activation_range(bits, unsigned), input_relu=relus[0], output_relu=relus[1])
    x = (rng.normal(size=data_shape) * 3).astype(np.float32)
    x_in = np.maximum(x, 0) if io.input_relu else x
    # calibrated scales clip the tails; dynamic ones see max|x|
    s = activation_scale(x_in, None if dynamic else float(np.abs(x_in).max() / 3 / io.act_hi), bits, unsigned)
    x.flat[:8] = np.float32(s) * np.float32([0.5, 1.5, -0.5, -2.5, 2.5, 126.5, -126.5, 3.5])  # ties round to even
    x_in = np.maximum(x, 0) if io.input_relu else x
    x_q = quantize_activation(x_in, s, bits, unsigned)
    pt, pl, pb, pr = layer.padding
    acc = int_conv2d(np.pad(x_q, ((0, 0), (0, 0), (pt, pb), (pl, pr))), codes, layer.strides, 0, layer.dilation)
    bias_q = rng.integers(-3000, 3000, out_c).astype(np.int32)
    scale = rng.uniform(1e-3, 1e-2, out_c).astype(np.float32)
    ref = epilogue(acc, bias_q, scale, relu=io.output_relu)
    inv = np.float32(1.0 / float(s))
    return layer, io, codes, (x, np.array(inv, np.float32)), (bias_q, scale), ref


def _run_fused(cases, schedule=None) -> None:
    import tvm
    from tvm import s_tir

    kernel = get_kernel(conv_vnni.NAME)
    target = get_target(HOST)
    for layer, io, codes, (x, inv), (bias_q, scale), ref in cases:
        sch = s_tir.Schedule(tvm.IRModule({"main": kernel.fused_prim_func(layer, io)}))
        (schedule or kernel.schedule)(sch, layer, target.feature_set())
        lib = tvm.tirx.build(sch.mod, target=target.tvm())
        arrays = [x, inv, *kernel.pack(layer, codes), bias_q, scale, np.zeros(ref.shape, np.float32)]
        args = [tvm.runtime.tensor(np.require(a, requirements="C")) for a in arrays]  # keeps 0-d inv 0-d
        lib["main"](*args)
        out = args[-1].numpy()
        mismatch = int(np.count_nonzero(out.view(np.int32) != ref.view(np.int32)))
        assert mismatch == 0, f"{layer} {io}: {mismatch} of {ref.size} outputs differ"


@needs_vnni
def test_fused_layer_is_bit_exact_against_the_reference_path():
    rng = np.random.default_rng(20261205)
    _run_fused([
        _fused_case(rng, (1, 16, 12, 12), 32, (3, 3), padding=(1, 1, 1, 1), cs="pow2-4", relus=(False, True)),
        _fused_case(rng, (2, 5, 9, 11), 7, (3, 3), padding=(1, 1, 1, 1), relus=(True, False), dynamic=False),
        _fused_case(rng, (1, 3, 23, 23), 16, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3), relus=(False, True)),
        _fused_case(rng, (1, 12, 14, 14), 24, (1, 1), stride=(2, 2), cs="ternary", dynamic=False),
        _fused_case(rng, (1, 8, 9, 10), 16, (3, 2), stride=(1, 2), padding=(0, 1, 2, 1), io_bits=(4, True),
                    relus=(True, True)),
        _fused_case(rng, (1, 4, 11, 11), 16, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2), io_bits=(3, False)),
    ])


@needs_vnni
def test_fused_layer_stays_bit_exact_under_sampled_tuning_schedules():
    rng = np.random.default_rng(6)
    kernel = get_kernel(conv_vnni.NAME)
    for seed in range(4):
        def schedule(sch, layer, features, seed=seed):
            sch.seed(seed)
            kernel.tuning_space(layer, features)(sch)

        case = _fused_case(rng, (1, 8, 12, 12), 64, (3, 3), stride=(1 + seed % 2,) * 2, padding=(1, 1, 1, 1),
                           relus=(seed % 2 == 0, True), dynamic=seed < 2)
        _run_fused([case], schedule)

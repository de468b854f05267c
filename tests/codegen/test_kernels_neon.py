"""ARM NEON int8 kernels (codegen/kernels/neon_int.py): what they serve, the int16 block bound,
and bit-exact against quant_reference on odd shapes under qemu-user — ``int8-sdot`` on
aarch64+dotprod (qemu as a Cortex-A76), ``int8-smmla`` on aarch64+i8mm (qemu ``-cpu max``),
``int8-smlal`` on plain aarch64 (as a Cortex-A53) and armv7. Each test builds all its cases into one bundle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lastbit.codegen.kernels import IntLayer, get_kernel, neon_int
from lastbit.passes.pow2_projection import code_set
from lastbit.targets import get_target

from tests.codegen.test_kernels import _conv_case, _dense_case, _extreme_dense, _run_cases, _tuned

DOTPROD = "aarch64-dotprod-linux-gnu"
I8MM = "aarch64-i8mm-linux-gnu"
NEON64 = frozenset({"neon", "popcount", "aarch64"})


def _conv(op="conv2d", cs="pow2-4", kh=3, groups=1, channels=8):
    if op == "dense":
        return IntLayer("dense", cs, code_set(cs).bits, (1, 64), (32, 64))
    return IntLayer("conv2d", cs, code_set(cs).bits, (1, channels, 8, 8), (8, channels // groups, kh, kh),
                    padding=(1, 1, 1, 1), groups=groups)


@pytest.mark.parametrize(
    "kernel, layer, features, reason",
    [
        ("int8-sdot", _conv(), NEON64 | {"dotprod"}, None),
        ("int8-sdot", _conv("dense", "int8"), NEON64 | {"dotprod"}, None),
        ("int8-sdot", _conv(), NEON64, "dotprod"),
        ("int8-sdot", _conv(groups=2), NEON64 | {"dotprod"}, "groups=2"),
        ("int8-smmla", _conv(), NEON64 | {"dotprod", "i8mm"}, None),
        ("int8-smmla", _conv("dense", "int8"), NEON64 | {"i8mm"}, None),
        ("int8-smmla", _conv(), NEON64 | {"dotprod"}, "i8mm"),
        ("int8-smmla", _conv(groups=2), NEON64 | {"i8mm"}, "groups=2"),
        ("lut-sdot", _conv(), NEON64 | {"dotprod"}, None),
        ("lut-sdot", _conv(cs="int8"), NEON64 | {"dotprod"}, "levels"),
        ("lut-sdot", _conv(), NEON64, "dotprod"),
        ("int8-smlal-v7", _conv(), frozenset({"neon", "armv7"}), None),
        ("int8-smlal", _conv(), frozenset({"neon", "armv7"}), "aarch64"),
        ("int8-smlal", _conv("dense", "int8"), NEON64, None),  # 1 tap: blocks of 2 int8 products
        ("int8-smlal", _conv(cs="int8"), NEON64, "overflow"),  # 9 taps × 128·127 > int16
        ("int8-smlal", _conv(), frozenset({"avx2"}), "neon"),
    ],
)
def test_supports_names_the_reason(kernel, layer, features, reason):
    got = get_kernel(kernel).supports(layer, features)
    assert got is None if reason is None else (got is not None and reason in got)


def test_int16_block_never_overflows():
    """The worst block of products (|x| = 128, |w| = max code) fits int16; one more channel does not."""
    for cs, kh in (("pow2-4", 3), ("pow2-2", 3), ("pow2-64", 1), ("ternary", 7), ("int8", 1)):
        layer = _conv(cs=cs, kh=kh, channels=64)
        block = neon_int.int16_block_channels(layer)
        worst = 128 * int(np.abs(code_set(cs).levels).max()) * kh * kh
        assert block >= 1 and block * worst <= 32767 < (block + 1) * worst
        assert neon_int.smlal_chunk(layer) <= block
    assert neon_int.int16_block_channels(_conv(cs="pow2-4", kh=3)) == 7  # 3-bit codes, 3×3: 63 products


def test_default_tile_fits_the_registers():
    for flavour, budget in ((neon_int.SDOT, 16), (neon_int.SMMLA, 16), (neon_int.SMLAL, 16), (neon_int.SMLAL_V7, 6)):
        big = IntLayer("conv2d", "pow2-4", 3, (1, 512, 7, 7), (512, 512, 3, 3))
        for layer in (_conv(channels=32), _conv("dense"), big):
            knobs = neon_int.default_knobs(flavour, layer)
            regs = knobs.oc_blocks * knobs.ow_tile * (2 if flavour.int16 else 1)
            assert 1 <= regs <= budget


def _cases(rng, kernel: str, cs: str):
    return [
        _dense_case(rng, kernel, cs, 1, 37, 75),  # batch 1, odd features and reduction
        _dense_case(rng, kernel, cs, 3, 21, 130),
        _conv_case(rng, kernel, cs, (1, 5, 9, 11), 7, (3, 3), (1, 1), (1, 1, 1, 1)),
        _conv_case(rng, kernel, cs, (2, 9, 8, 7), 6, (3, 2), (2, 1), (0, 1, 2, 1), dilation=(1, 2)),
        _extreme_dense(kernel, cs, n=20, k=301),
    ]


def _skip_without_tools(triple):
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")


@pytest.mark.qemu
def test_sdot_kernel_is_bit_exact_under_qemu(tmp_path):
    _skip_without_tools(DOTPROD)
    rng = np.random.default_rng(12)
    cases = _cases(rng, "int8-sdot", "pow2-4") + _cases(rng, "int8-sdot", "int8")[:3] + [
        _conv_case(rng, "int8-sdot", "pow2-4", (1, 16, 5, 4), 64, (3, 3), (1, 1), (1, 1, 1, 1)),  # tiles of blocks
    ]
    _run_cases(cases, DOTPROD, tmp_path)


def test_smmla_counts_the_padded_tiles():
    """A spare pixel per odd row, a spare row for a batch-1 dense, channels to blocks of 8 × 2."""
    assert neon_int.executed_macs(neon_int.SMMLA, _conv(channels=8)) == 8 * 8 * 8 * 8 * 9
    odd = IntLayer("conv2d", "pow2-4", 3, (1, 5, 7, 7), (3, 5, 3, 3), padding=(1, 1, 1, 1))
    assert neon_int.executed_macs(neon_int.SMMLA, odd) == 7 * 8 * 4 * 8 * 9
    assert neon_int.executed_macs(neon_int.SMMLA, _conv("dense")) == 2 * 64 * 32


def test_index_fields_round_trip():
    """Every packed index comes back from its byte and field, with P vectors per 16 bytes."""
    rng = np.random.default_rng(5)
    for bits, group in ((2, 3), (4, 3), (4, 1), (2, 8)):
        blocks = rng.integers(0, 1 << bits, size=(2, 3, group, 4, 4)).astype(np.int8)
        fields = neon_int.pack_index_fields(blocks, bits)
        per_byte = 8 // bits
        assert fields.shape == (2, 3, -(-group // per_byte), 16)
        for g in range(group):
            got = (fields[..., g // per_byte, :] >> (bits * (g % per_byte))) & ((1 << bits) - 1)
            assert np.array_equal(got, blocks[..., g, :, :].reshape(2, 3, 16))


@pytest.mark.qemu
def test_lut_sdot_kernel_is_bit_exact_under_qemu(tmp_path):
    """2-bit fields (ternary, pow2-2) and 4-bit fields (pow2-4, pow2-8, 15 levels) on the same
    odd shapes as int8-sdot; tiles of one and of several channel blocks."""
    _skip_without_tools(DOTPROD)
    rng = np.random.default_rng(21)
    cases = _cases(rng, "lut-sdot", "pow2-4") + _cases(rng, "lut-sdot", "ternary")[:3] + [
        _conv_case(rng, "lut-sdot", "pow2-2", (1, 16, 5, 4), 64, (3, 3), (1, 1), (1, 1, 1, 1)),  # tiles of blocks
        _conv_case(rng, "lut-sdot", "pow2-8", (1, 13, 6, 6), 33, (3, 3), (2, 2), (1, 1, 1, 1)),
        _dense_case(rng, "lut-sdot", "pow2-4", 3, 21, 130),
    ]
    _run_cases(cases, DOTPROD, tmp_path)


@pytest.mark.qemu
def test_smmla_kernel_is_bit_exact_under_qemu(tmp_path):
    """Odd rows (a spare pixel), odd channel counts (padded to 8 and 2), stride 2 with dilation
    (the stride-phase packing), padding, batches, dense layers with odd rows."""
    _skip_without_tools(I8MM)
    rng = np.random.default_rng(18)
    cases = _cases(rng, "int8-smmla", "pow2-4") + _cases(rng, "int8-smmla", "int8")[:3] + [
        _conv_case(rng, "int8-smmla", "pow2-4", (1, 16, 5, 4), 64, (3, 3), (1, 1), (1, 1, 1, 1)),  # tiles of blocks
        _conv_case(rng, "int8-smmla", "ternary", (2, 13, 9, 9), 5, (3, 3), (2, 2), (1, 1, 1, 1)),  # stride 2, odd
        _conv_case(rng, "int8-smmla", "pow2-4", (1, 3, 11, 10), 7, (1, 3), (1, 3), (0, 2, 0, 1), dilation=(1, 2)),
        _dense_case(rng, "int8-smmla", "int8", 5, 3, 9),  # odd rows, fewer outputs than a block pair
    ]
    _run_cases(cases, I8MM, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("triple, kernel",
                         [("aarch64-linux-gnu", "int8-smlal"), ("armv7a-linux-gnueabihf", "int8-smlal-v7")])
def test_smlal_kernel_is_bit_exact_under_qemu(triple, kernel, tmp_path):
    _skip_without_tools(triple)
    rng = np.random.default_rng(len(triple))
    cases = _cases(rng, kernel, "pow2-4") + [
        _dense_case(rng, kernel, "int8", 2, 19, 77),  # blocks of 2 int8 products
        _extreme_dense(kernel, "int8", n=20, k=301),
        _conv_case(rng, kernel, "ternary", (1, 13, 6, 6), 33, (3, 3), (1, 1), (1, 1, 1, 1)),  # padded C
        _conv_case(rng, kernel, "pow2-4", (1, 16, 5, 4), 64, (3, 3), (1, 1), (1, 1, 1, 1)),  # tiles of several blocks
    ]
    _run_cases(cases, triple, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("triple, kernel, older_cpu", [(DOTPROD, "int8-sdot", "cortex-a53"),
                                                       (I8MM, "int8-smmla", "cortex-a76")])
def test_older_cpu_refuses_the_extension(triple, kernel, older_cpu, tmp_path):
    """sdot code under a qemu Cortex-A53 (the plain target's cpu), smmla code under a Cortex-A76
    (the dotprod target's): each must stop, so the kernels really issue the instruction."""
    _skip_without_tools(triple)
    from lastbit.errors import RunError

    from lastbit.codegen.bundle import build_bundle, run_bundle
    from lastbit.codegen.kernels.common import kernels_module

    rng = np.random.default_rng(3)
    kernel, layer, codes, x, ref = _dense_case(rng, kernel, "pow2-4", 1, 8, 16)
    target = get_target(triple)
    mod = kernels_module([(kernel, layer, codes)], target.feature_set())
    bundle = build_bundle(mod, target, tmp_path / "own-cpu")
    assert np.array_equal(run_bundle(bundle, [x])[0], ref)  # on the target's own qemu cpu: runs
    older = build_bundle(mod, dataclasses.replace(target, qemu_cpu=older_cpu), tmp_path / "older-cpu")
    with pytest.raises(RunError, match="signal 4"):  # SIGILL
        run_bundle(older, [x])


@pytest.mark.qemu
@pytest.mark.parametrize("triple, kernel", [(DOTPROD, "int8-sdot"), ("aarch64-linux-gnu", "int8-smlal")])
def test_sampled_tuning_schedules_stay_bit_exact_under_qemu(triple, kernel, tmp_path):
    """Any point of the tuning space (register tile of channel blocks × columns, taps unrolled
    or not) computes exactly what the default does, on layers with several blocks and columns."""
    _skip_without_tools(triple)
    rng = np.random.default_rng(21)
    cases = []
    for seed in range(4):
        conv = _conv_case(rng, kernel, "pow2-4", (1, 16, 5, 8), 64, (3, 3), (1, 1), (1, 1, 1, 1))
        cases.append((_tuned(conv[0], seed), *conv[1:]))
    dense = _dense_case(rng, kernel, "pow2-4", 6, 48, 70)
    cases.append((_tuned(dense[0], 5), *dense[1:]))
    _run_cases(cases, triple, tmp_path)


def test_tuning_space_samples_the_register_tile_and_unroll():
    """Channel blocks, output columns and tap unrolling are all decisions of the space."""
    from tvm import s_tir
    import tvm

    layer = IntLayer("conv2d", "pow2-4", 3, (1, 16, 8, 8), (64, 16, 3, 3), padding=(1, 1, 1, 1))
    for name in ("int8-sdot", "int8-smlal"):
        kernel = get_kernel(name)
        seen = set()
        for seed in range(12):
            sch = s_tir.Schedule(tvm.IRModule({"main": kernel.prim_func(layer)}), seed=seed + 1)
            kernel.tuning_space(layer, NEON64 | {"dotprod"})(sch)
            seen.add(str(list(sch.trace.decisions.values())))
        kinds = [str(i.kind.name) for i in sch.trace.insts if str(i.kind.name).startswith("Sample")]
        assert kinds == ["SamplePerfectTile", "SamplePerfectTile", "SampleCategorical"], name
        assert len(seen) > 3, name


# --------------------------------------------------------------------------------------------
# fused: the layer's quantize and epilogue inside the kernel (FusedIO), under qemu
# --------------------------------------------------------------------------------------------


def _fused(rng, kernel: str, data_shape, out_c, ksize, **conv):
    """A random whole layer (quantize → int conv → epilogue in numpy, tests.codegen.
    test_kernels_conv_vnni._fused_case) as a fused case of ``kernel``."""
    from lastbit.codegen.kernels.common import FusedArgs
    from tests.codegen.test_kernels_conv_vnni import _fused_case

    layer, io, codes, (x, inv), (bias_q, scale), ref = _fused_case(rng, data_shape, out_c, ksize, **conv)
    return (get_kernel(kernel), layer, codes, FusedArgs(io, float(inv), bias_q, scale)), x, ref


def _run_fused(cases, triple: str, tmp_path) -> None:
    from lastbit.codegen.bundle import build_bundle, run_bundle
    from lastbit.codegen.kernels.common import kernels_module

    target = get_target(triple)
    bundle = build_bundle(kernels_module([case for case, _, _ in cases], target.feature_set()), target,
                          tmp_path / f"fused-{triple}")
    outs = run_bundle(bundle, [x for _, x, _ in cases], timeout_s=600)
    for (case, _, ref), out in zip(cases, outs):
        mismatch = int(np.count_nonzero(out.view(np.int32) != ref.view(np.int32)))
        assert mismatch == 0, f"{case[0].name} {case[1]} {case[3].io}: {mismatch} of {ref.size} outputs differ"


def _fused_cases(rng, kernel: str, cs: str):
    """Rows of 16, 14, 10 and 12 (runs of 8, 2 and 4 columns), channels not a multiple of the pack's 4
    and outputs not of the block's 4 (the pixel-at-a-time pack, clamped bias index), stride 2,
    no padding, dilation, asymmetric padding, 4-bit unsigned and 3-bit activations, ReLU
    before and after."""
    return [
        _fused(rng, kernel, (1, 16, 12, 16), 32, (3, 3), padding=(1, 1, 1, 1), cs=cs, relus=(False, True)),
        _fused(rng, kernel, (2, 5, 9, 11), 7, (3, 3), padding=(1, 1, 1, 1), cs=cs, relus=(True, False), dynamic=False),
        _fused(rng, kernel, (1, 8, 14, 14), 16, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1), cs=cs,
               relus=(False, True)),
        _fused(rng, kernel, (1, 12, 10, 10), 24, (1, 1), stride=(2, 2), cs=cs, io_bits=(4, True), relus=(True, True)),
        _fused(rng, kernel, (1, 4, 11, 11), 16, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2), cs=cs,
               io_bits=(3, False)),
        _fused(rng, kernel, (1, 8, 9, 8), 8, (3, 2), stride=(1, 2), padding=(0, 1, 2, 1), cs=cs, relus=(True, True)),
        _fused(rng, kernel, (1, 8, 5, 12), 12, (3, 3), padding=(1, 1, 1, 1), cs=cs, io_bits=(4, True)),  # runs of 4
    ]


@pytest.mark.qemu
def test_fused_sdot_layer_is_bit_exact_under_qemu(tmp_path):
    _skip_without_tools(DOTPROD)
    rng = np.random.default_rng(1205)
    cases = _fused_cases(rng, "int8-sdot", "pow2-4") + _fused_cases(rng, "int8-sdot", "int8")[:2] + [
        _fused(rng, "lut-sdot", (1, 16, 8, 8), 16, (3, 3), padding=(1, 1, 1, 1), cs="ternary", relus=(False, True)),
        _fused(rng, "lut-sdot", (1, 6, 7, 7), 5, (3, 3), padding=(1, 1, 1, 1), cs="pow2-4", relus=(True, False)),
    ]
    _run_fused(cases, DOTPROD, tmp_path)


@pytest.mark.qemu
def test_fused_smlal_layer_is_bit_exact_under_qemu(tmp_path):
    """Layers it fuses (≥ 32 channels, stride 1: the vector row pack) and ones it declines
    (the pixel-at-a-time pack), which must still give the same bits when asked."""
    _skip_without_tools("aarch64-linux-gnu")
    rng = np.random.default_rng(24)
    cases = _fused_cases(rng, "int8-smlal", "pow2-4")[:3] + [
        _fused(rng, "int8-smlal", (1, 32, 10, 14), 16, (3, 3), padding=(1, 1, 1, 1), cs="pow2-4", relus=(False, True)),
        _fused(rng, "int8-smlal", (1, 40, 6, 8), 24, (1, 1), cs="ternary", io_bits=(4, True), relus=(True, True)),
    ]
    assert [get_kernel("int8-smlal").fuses(case[1]) for case, _, _ in cases[-2:]] == [True, True]
    _run_fused(cases, "aarch64-linux-gnu", tmp_path)


def test_fused_form_only_where_it_counted_fewer_instructions():
    """sdot and smlal offer it (smmla's pack and armv7 keep three functions), and only for
    layers their vector pack serves: channels in whole blocks of 4, an even row; smlal also
    ≥ 32 channels at stride 1."""
    offered = {k: get_kernel(k).fused_prim_func is not None
               for k in ("int8-sdot", "lut-sdot", "int8-smlal", "int8-smmla", "int8-smlal-v7")}
    assert offered == {"int8-sdot": True, "lut-sdot": True, "int8-smlal": True, "int8-smmla": False,
                       "int8-smlal-v7": False}
    smlal = get_kernel("int8-smlal")
    assert smlal.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 32, 14, 14), (32, 32, 3, 3), padding=(1, 1, 1, 1)))
    assert not smlal.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 16, 32, 32), (16, 16, 3, 3), padding=(1, 1, 1, 1)))
    assert not smlal.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 32, 16, 16), (64, 32, 3, 3), strides=(2, 2)))
    sdot = get_kernel("int8-sdot")
    assert sdot.fuses(_conv(channels=8)) and sdot.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 16, 14, 14), (8, 16, 3, 3)))
    assert not sdot.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 3, 32, 32), (16, 3, 3, 3)))  # C = 3
    assert not sdot.fuses(IntLayer("conv2d", "pow2-4", 3, (1, 512, 7, 7), (512, 512, 3, 3)))  # odd row
    assert not sdot.fuses(_conv("dense"))
    assert [neon_int.pack_columns(_conv(channels=8)), neon_int.pack_columns(
        IntLayer("conv2d", "pow2-4", 3, (1, 4, 28, 28), (4, 4, 3, 3)))] == [8, 4]


@pytest.mark.qemu
def test_fused_layer_stays_bit_exact_under_sampled_tuning_schedules(tmp_path):
    _skip_without_tools(DOTPROD)
    rng = np.random.default_rng(33)
    cases = []
    for seed in range(4):
        (base, *rest), x, ref = _fused(rng, "int8-sdot", (1, 8, 12, 16), 64, (3, 3), stride=(1 + seed % 2,) * 2,
                                       padding=(1, 1, 1, 1), cs="pow2-4", relus=(seed % 2 == 0, True))
        cases.append(((_tuned(base, seed), *rest), x, ref))
    _run_fused(cases, DOTPROD, tmp_path)

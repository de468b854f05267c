"""The accelerator compiler and simulators: bit-exact against quant_reference on random
layers and tilings, and a cycle model that respects its own bounds."""

import math
from dataclasses import replace

import numpy as np
import pytest

from lastbit.codegen import quant_reference as qr
from lastbit.codegen.accel import AccelConfig, AccelConfigError, load_presets, preset
from lastbit.codegen.accel.compiler import (
    AccelCompileError,
    ConvLayer,
    compile_layer,
    decode_fields,
    encode_weights,
    pow2_fields,
    tiling_candidates,
)
from lastbit.codegen.accel.energy import estimate_energy, pe_energy_pj
from lastbit.codegen.accel.functional_sim import FunctionalSimulator, run_layer
from lastbit.codegen.accel.isa import AluOp, Instruction, Opcode
from lastbit.codegen.accel.timing_sim import (
    DeadlockError,
    instruction_cycles,
    simulate_timing,
)


def _pow2_codes(rng, shape, max_shift=6):
    mags = 2 ** rng.integers(0, max_shift + 1, shape)
    return (rng.choice([-1, 1], shape) * mags * rng.integers(0, 2, shape)).astype(np.int8)


def _reference(layer: ConvLayer, x, codes, bias):
    acc = qr.int_conv2d(x, codes, layer.stride, (layer.padding[0], layer.padding[1]))
    total = acc + bias[None, :, None, None]
    return np.maximum(total, 0) if layer.relu else total


# batch, channels, height, width, out, kernel, stride, padding, relu
SHAPES = [
    (1, 3, 9, 7, 5, 3, 1, 1, False),
    (2, 20, 11, 13, 17, 3, 2, 1, True),
    (1, 16, 8, 8, 8, 1, 1, 0, False),
    (1, 9, 15, 15, 33, 5, 2, 2, True),
    (1, 1, 6, 6, 1, 2, 3, 1, False),
    (1, 40, 5, 4, 24, 3, 1, 2, True),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preset_name", ["small", "default"])
def test_functional_sim_is_bit_exact_on_random_layers_and_tilings(shape, preset_name):
    n, c, h, w, o, k, s, p, relu = shape
    rng = np.random.default_rng(hash((shape, preset_name)) % 2**32)
    layer = ConvLayer("t", n, c, h, w, o, (k, k), (s, s), (p, p, p, p), relu)
    cfg = preset(preset_name)
    x = rng.integers(-127, 128, (n, c, h, w)).astype(np.int8)
    codes = _pow2_codes(rng, (o, c, k, k))
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    want = _reference(layer, x, codes, bias)
    candidates = tiling_candidates(layer, cfg)
    picks = [None] + [candidates[i] for i in rng.choice(len(candidates), min(6, len(candidates)), replace=False)]
    sim = FunctionalSimulator(cfg)
    for tiling in picks:
        program = compile_layer(layer, codes, cfg, tiling)
        assert np.array_equal(run_layer(program, x, bias, sim), want), program.tiling


@pytest.mark.parametrize("tile_cb", [2, 16])  # reductions of 288 and 2304 terms: float32 and float64 BLAS
def test_extreme_values_and_long_reductions_stay_exact(tile_cb):
    from lastbit.codegen.accel.compiler import Tiling

    rng = np.random.default_rng(tile_cb)
    layer = ConvLayer("deep", 1, 256, 3, 3, 16, (3, 3), (1, 1), (1, 1, 1, 1), False)
    # same-sign terms, so sums pass 2^24 with odd low bits (float32 would round them)
    x = rng.choice(np.array([127, 125], dtype=np.int8), (1, 256, 3, 3))
    codes = rng.choice(np.array([64, 1], dtype=np.int8), (16, 256, 3, 3), p=[0.97, 0.03])
    x[0, 0, 0, 0], codes[0, 0, 0, 0] = -128, -64
    program = compile_layer(layer, codes, preset(), Tiling(1, 3, 1, tile_cb))
    want = qr.int_conv2d(x, codes, 1, 1)
    assert want.max() > 1 << 24  # beyond what float32 holds exactly
    assert np.array_equal(run_layer(program, x), want)


def test_dense_layer_and_int8_mac_twin_match_the_reference():
    rng = np.random.default_rng(1)
    m, k, n = 3, 70, 21
    x = rng.integers(-127, 128, (m, k)).astype(np.int8)
    codes = _pow2_codes(rng, (n, k))
    layer = ConvLayer.dense("fc", m, k, n)
    want = qr.int_dense(x, codes)
    for cfg in (preset("small"), preset("small").mac8_twin()):
        got = run_layer(compile_layer(layer, codes, cfg), x.T[None, :, None, :])
        assert np.array_equal(got[0, :, 0, :].T, want)


def test_weight_fields_round_trip_and_reject_non_powers_of_two():
    codes = np.array([0, 1, -1, 2, -2, 4, -8, 16, -32, 64, -64], dtype=np.int8)
    assert np.array_equal(decode_fields(pow2_fields(codes)), codes)
    with pytest.raises(AccelCompileError, match="weight code 3"):
        pow2_fields(np.array([1, 3], dtype=np.int8))
    with pytest.raises(AccelCompileError, match="weight code -128"):
        encode_weights(np.full((1, 1, 1, 1), -128, dtype=np.int8), preset("small"))
    # 4-bit fields: half the bytes of the int8-MAC design's weights
    w = _pow2_codes(np.random.default_rng(0), (32, 32, 3, 3))
    cfg = preset()
    assert encode_weights(w, cfg).size * 2 == encode_weights(w, cfg.mac8_twin()).size


def test_alu_shift_clip_and_wrapping():
    cfg = preset("small")
    sim = FunctionalSimulator(cfg)
    sim.acc[:4] = np.arange(4 * cfg.rows, dtype=np.int32).reshape(4, cfg.rows) * 37 - 500
    before = sim.acc[:4].copy()
    program = [Instruction(Opcode.ALU, dict(alu_op=AluOp.SHR_IMM, dst_base=0, out_blocks=1, pixels=4, imm=2)),
               Instruction(Opcode.ALU, dict(alu_op=AluOp.MAX_IMM, dst_base=0, out_blocks=1, pixels=4, imm=-20)),
               Instruction(Opcode.ALU, dict(alu_op=AluOp.MIN_IMM, dst_base=0, out_blocks=1, pixels=4, imm=100)),
               Instruction(Opcode.FINISH)]
    sim.run(program, np.zeros(64, np.uint8))
    assert np.array_equal(sim.acc[:4], np.clip(before >> 2, -20, 100))
    sim.acc[0] = np.iinfo(np.int32).max
    sim.run([Instruction(Opcode.ALU, dict(alu_op=AluOp.ADD_IMM, dst_base=0, out_blocks=1, pixels=1, imm=1)),
             Instruction(Opcode.FINISH)], np.zeros(64, np.uint8))
    assert sim.acc[0, 0] == np.iinfo(np.int32).min  # int32 hardware wraps


def _conv(c, h, o, k=3, s=1, name="conv"):
    p = k // 2
    return ConvLayer(name, 1, c, h, h, o, (k, k), (s, s), (p, p, p, p), True)


def test_timing_respects_compute_and_dma_bounds_and_overlaps_queues():
    cfg = preset()
    for layer in (_conv(64, 28, 64), _conv(16, 30, 256, k=1), _conv(256, 7, 256)):
        program = compile_layer(layer, np.ones((layer.out_channels, layer.in_channels, *layer.kernel), np.int8), cfg)
        report, start, end = simulate_timing(program.instructions, cfg, layer.macs, return_schedule=True)
        compute = sum(instruction_cycles(i, cfg) for i in program.instructions if i.queue == 1)
        dma_bound = report.dram_bytes / cfg.dram_bytes_per_cycle
        assert report.cycles >= compute and report.cycles >= dma_bound
        assert report.pe_cycles * cfg.pes >= layer.macs
        assert report.cycles < report.load_busy + report.compute_busy + report.store_busy  # queues overlap
        # dependency tokens hold: each GEMM starts after the loads of its step finished
        last_load_end = 0
        for i, inst in enumerate(program.instructions):
            if inst.queue == 0:
                last_load_end = max(last_load_end, end[i]) if inst.push_next else last_load_end
            if inst.opcode == Opcode.GEMM:
                assert start[i] >= last_load_end


def test_broken_tokens_deadlock_with_a_clear_error():
    cfg = preset("small")
    layer = _conv(8, 8, 8)
    program = compile_layer(layer, np.ones((8, 8, 3, 3), np.int8), cfg).instructions
    # the first GEMM waits for a store that can only follow it
    index = next(i for i, inst in enumerate(program) if inst.opcode == Opcode.GEMM)
    broken = list(program)
    broken[index] = replace(program[index], args=dict(program[index].args), pop_next=True)
    simulate_timing(program, cfg)  # the compiled program itself is fine
    with pytest.raises(DeadlockError, match="deadlock"):
        simulate_timing(broken, cfg)


def test_resnet18_3x3_convs_keep_the_default_array_busy():
    """The utilisation goal of the issue: ≥ 80% on ResNet-18's 3×3 convolutions."""
    cfg = preset()
    layers = [_conv(64, 56, 64), _conv(64, 56, 128, s=2), _conv(128, 28, 128), _conv(128, 28, 256, s=2),
              _conv(256, 14, 256), _conv(256, 14, 512, s=2), _conv(512, 7, 512)]
    for layer in layers:
        program = compile_layer(layer, np.ones((layer.out_channels, layer.in_channels, 3, 3), np.int8), cfg)
        report = simulate_timing(program.instructions, cfg, layer.macs)
        assert report.pe_utilisation >= 0.8, (layer, program.tiling, report.pe_utilisation)


def test_energy_favours_shift_add_and_dram_dominates_for_a_dma_heavy_layer():
    assert pe_energy_pj("shift-add") < pe_energy_pj("mac8") < pe_energy_pj("fp32-mac")
    cfg = preset()
    layer = _conv(256, 14, 256)
    codes = np.ones((256, 256, 3, 3), np.int8)
    ours = simulate_timing(compile_layer(layer, codes, cfg).instructions, cfg, layer.macs)
    twin = cfg.mac8_twin()
    theirs = simulate_timing(compile_layer(layer, codes, twin).instructions, twin, layer.macs)
    e_ours, e_theirs = estimate_energy(ours, cfg), estimate_energy(theirs, twin)
    assert e_ours.pe_pj < e_theirs.pe_pj and e_ours.total_pj < e_theirs.total_pj
    assert ours.dram_read_bytes < theirs.dram_read_bytes
    assert e_ours.pe_area_mm2 < e_theirs.pe_area_mm2


def test_presets_and_config_validation():
    presets = load_presets()
    assert {"default", "small", "large"} <= set(presets)
    assert presets["default"].rows == 16 and presets["small"].pes == 64
    with pytest.raises(AccelConfigError, match="weight_bits"):
        AccelConfig(pe="mac8", weight_bits=4)
    with pytest.raises(AccelConfigError, match="rows must be positive"):
        AccelConfig(rows=0)
    with pytest.raises(AccelConfigError, match="unknown accelerator preset 'nope'"):
        preset("nope")
    with pytest.raises(AccelCompileError, match="padding"):
        compile_layer(ConvLayer("bad", 1, 4, 8, 8, 4, (3, 3), (1, 1), (3, 3, 3, 3)), np.ones((4, 4, 3, 3), np.int8),
                      presets["small"])
    assert math.isclose(presets["default"].mac8_twin().weight_entry_bytes, 2 * presets["default"].weight_entry_bytes)

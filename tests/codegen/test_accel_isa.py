"""The accelerator ISA: every instruction survives encode -> decode, bad fields are refused."""

import numpy as np
import pytest

from lastbit.codegen.accel.isa import (
    FIELDS,
    Instruction,
    IsaError,
    Opcode,
    decode,
    encode,
)


def _random_instruction(rng: np.random.Generator, opcode: Opcode) -> Instruction:
    args = {}
    for name, width, signed in FIELDS[opcode]:
        lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
        args[name] = int(rng.choice([lo, hi, rng.integers(lo, hi + 1)]))
    flags = rng.integers(0, 2, 4).astype(bool)
    return Instruction(opcode, args, *flags)


def test_round_trip_every_opcode_and_extreme_fields():
    rng = np.random.default_rng(0)
    program = [_random_instruction(rng, op) for _ in range(200) for op in Opcode]
    words = encode(program)
    assert words.shape == (len(program), 2) and words.dtype == np.uint64
    assert decode(words) == program
    assert np.array_equal(encode(decode(words)), words)


def test_field_overflow_and_unknown_names_are_errors():
    with pytest.raises(IsaError, match="out_h=256"):
        encode([Instruction(Opcode.GEMM, {"out_h": 256})])
    with pytest.raises(IsaError, match="imm=-40000"):
        encode([Instruction(Opcode.ALU, {"imm": -40000})])
    with pytest.raises(IsaError, match="unknown fields"):
        Instruction(Opcode.LOAD, {"bogus": 1})
    with pytest.raises(IsaError, match="unknown opcode 7"):
        decode(np.array([[7, 0]], dtype=np.uint64))


def test_queue_of_each_instruction():
    assert Instruction(Opcode.LOAD, {"buffer": 0}).queue.name == "LOAD"
    assert Instruction(Opcode.LOAD, {"buffer": 2}).queue.name == "COMPUTE"  # biases into the accumulators
    assert Instruction(Opcode.STORE).queue.name == "STORE"
    assert Instruction(Opcode.GEMM).queue.name == "COMPUTE"

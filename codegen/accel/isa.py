"""The accelerator's instruction set: LOAD, STORE, GEMM, ALU, FINISH, each 128 bits.

As in VTA, three queues run in parallel — load (LOAD into the input/weight buffers),
compute (GEMM, ALU, LOAD of biases into the accumulator buffer, FINISH) and store — and
every instruction carries four dependency flags. ``pop_prev``/``pop_next`` wait for a token
from the neighbouring queue (load ← compute → store); ``push_prev``/``push_next`` send one
when the instruction completes. The compiler places them so a buffer half is never
overwritten while another queue still reads it (see compiler.py).

Encoding: bits 0-2 opcode, bits 3-6 the flags (pop_prev, pop_next, push_prev, push_next),
then the opcode's fields from bit 7 upward in the order of ``FIELDS`` (docs/ACCELERATOR.md
has the table). Words are little-endian: ``encode`` returns two uint64 per instruction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from lastbit.errors import LastbitError

__all__ = ["FIELDS", "AluOp", "Buffer", "Instruction", "IsaError", "Opcode", "Queue", "decode", "encode"]


class IsaError(LastbitError):
    """An instruction field does not fit its encoding, or a word does not decode."""


class Opcode(enum.IntEnum):
    LOAD = 0
    STORE = 1
    GEMM = 2
    ALU = 3
    FINISH = 4


class Buffer(enum.IntEnum):
    INPUT = 0
    WEIGHT = 1
    ACC = 2


class AluOp(enum.IntEnum):
    ADD_VEC = 0  # acc[dst + o·pix + p] += acc[src + o] (a per-channel vector, e.g. the bias)
    ADD_IMM = 1
    MAX_IMM = 2  # MAX 0 is ReLU
    MIN_IMM = 3  # with MAX_IMM: clip
    SHR_IMM = 4  # arithmetic shift right


class Queue(enum.IntEnum):
    LOAD = 0
    COMPUTE = 1
    STORE = 2


# (field, bits, signed) after the 7 header bits, per opcode.
FIELDS: dict[Opcode, tuple[tuple[str, int, bool], ...]] = {
    Opcode.LOAD: (("buffer", 2, False), ("sram_base", 16, False), ("dram_base", 32, False),
                  ("y_size", 10, False), ("x_size", 10, False), ("x_stride", 16, False),
                  ("pad_top", 4, False), ("pad_bottom", 4, False), ("pad_left", 4, False), ("pad_right", 4, False)),
    Opcode.STORE: (("buffer", 2, False), ("sram_base", 16, False), ("dram_base", 32, False),
                   ("y_size", 10, False), ("x_size", 10, False), ("x_stride", 16, False)),
    Opcode.GEMM: (("reset", 1, False), ("acc_base", 16, False), ("inp_base", 16, False), ("wgt_base", 16, False),
                  ("out_h", 8, False), ("out_w", 8, False), ("kernel_h", 4, False), ("kernel_w", 4, False),
                  ("stride_h", 3, False), ("stride_w", 3, False), ("in_blocks", 8, False), ("out_blocks", 8, False)),
    Opcode.ALU: (("alu_op", 3, False), ("dst_base", 16, False), ("src_base", 16, False),
                 ("out_blocks", 8, False), ("pixels", 16, False), ("imm", 16, True)),
    Opcode.FINISH: (),
}
_HEADER_BITS = 7
_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")


@dataclass
class Instruction:
    """One decoded instruction: the opcode, its dependency flags and its fields by name.

    LOAD/STORE move a 2-D pattern of SRAM entries (y_size rows of x_size entries, DRAM rows
    x_stride entries apart); LOAD of the input zero-fills pad_* entries around the pattern
    (rows of pad_left + x_size + pad_right entries). GEMM computes a whole output tile.
    """

    opcode: Opcode
    args: dict[str, int] = field(default_factory=dict)
    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False

    def __post_init__(self) -> None:
        self.opcode = Opcode(self.opcode)
        names = {name for name, _, _ in FIELDS[self.opcode]}
        unknown = set(self.args) - names
        if unknown:
            raise IsaError(f"{self.opcode.name}: unknown fields {sorted(unknown)}")
        self.args = {name: int(self.args.get(name, 0)) for name, _, _ in FIELDS[self.opcode]}

    def __getattr__(self, name: str) -> int:
        args = self.__dict__.get("args", {})
        if name in args:
            return args[name]
        raise AttributeError(name)

    @property
    def queue(self) -> Queue:
        if self.opcode == Opcode.LOAD and self.args["buffer"] != Buffer.ACC:
            return Queue.LOAD
        if self.opcode == Opcode.STORE:
            return Queue.STORE
        return Queue.COMPUTE

    def flags(self) -> tuple[bool, bool, bool, bool]:
        return tuple(bool(getattr(self, f)) for f in _FLAGS)

    def __str__(self) -> str:
        deps = "".join(c if on else "." for c, on in zip("<>[]", self.flags()))
        body = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.opcode.name:<6} {deps} {body}"


def encode(program: list[Instruction]) -> np.ndarray:
    """The binary program: a uint64 array of shape [len(program), 2] (low word first)."""
    words = np.zeros((len(program), 2), dtype=np.uint64)
    for i, inst in enumerate(program):
        value = int(inst.opcode)
        for bit, flag in enumerate(_FLAGS):
            value |= int(bool(getattr(inst, flag))) << (3 + bit)
        shift = _HEADER_BITS
        for name, width, signed in FIELDS[inst.opcode]:
            v = inst.args[name]
            lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
            if not lo <= v <= hi:
                raise IsaError(f"instruction {i} ({inst.opcode.name}): {name}={v} does not fit {width} bits")
            value |= (v & ((1 << width) - 1)) << shift
            shift += width
        words[i, 0] = value & 0xFFFF_FFFF_FFFF_FFFF
        words[i, 1] = value >> 64
    return words


def decode(words: np.ndarray) -> list[Instruction]:
    """Inverse of :func:`encode`."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1, 2)
    program = []
    for i, (lo, hi) in enumerate(words):
        value = int(lo) | (int(hi) << 64)
        code = value & 0x7
        if code not in Opcode._value2member_map_:
            raise IsaError(f"word {i}: unknown opcode {code}")
        opcode = Opcode(code)
        flags = {flag: bool((value >> (3 + bit)) & 1) for bit, flag in enumerate(_FLAGS)}
        shift, args = _HEADER_BITS, {}
        for name, width, signed in FIELDS[opcode]:
            v = (value >> shift) & ((1 << width) - 1)
            if signed and v >> (width - 1):
                v -= 1 << width
            args[name] = v
            shift += width
        program.append(Instruction(opcode, args, **flags))
    return program


def _check_widths() -> None:
    """Every instruction format fits its 128 bits (checked once, at import)."""
    for opcode, spec in FIELDS.items():
        total = _HEADER_BITS + sum(width for _, width, _ in spec)
        if total > 128:
            raise IsaError(f"{opcode.name} needs {total} bits, an instruction has 128")


_check_widths()

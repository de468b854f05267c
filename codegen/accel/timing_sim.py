"""Cycle model of an accelerator program: three in-order queues (load, compute, store)
that overlap, synchronised only by their dependency tokens, with every DMA limited by the
DRAM bandwidth.

Costs: a LOAD/STORE takes ``dma_latency_cycles`` + bytes / ``dram_bytes_per_cycle`` (only
the bytes that move; padding is zero-filled on chip); a GEMM ``gemm_pipeline_cycles`` + one
cycle per (output block, input block, kernel tap, pixel) — each cycle the rows×cols array
applies one weight block to one input vector; an ALU op one cycle per accumulator entry.
An instruction starts when its queue is free and every token it pops has been pushed; it
pushes its tokens when it ends.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.isa import Buffer, Instruction, Opcode, Queue
from lastbit.errors import LastbitError

__all__ = ["DeadlockError", "TimingReport", "instruction_cycles", "simulate_timing"]


class DeadlockError(LastbitError):
    """The queues wait on tokens that are never pushed: the program's dependency flags are wrong."""


@dataclass
class TimingReport:
    """What one program costs on the accelerator."""

    cycles: int
    macs: int  # useful multiply-accumulates (the layer's, without channel padding)
    pe_cycles: int  # cycles the array computes (GEMM, without pipeline fill)
    load_busy: int
    compute_busy: int
    store_busy: int
    dram_read_bytes: int
    dram_write_bytes: int
    sram_input_read_bytes: int
    sram_weight_read_bytes: int
    sram_acc_access_bytes: int  # accumulator reads + writes (GEMM, ALU, DMA)
    pes: int
    clock_mhz: float

    @property
    def pe_utilisation(self) -> float:
        """Useful MACs over what the array could do in all the cycles."""
        return self.macs / (self.cycles * self.pes) if self.cycles else 0.0

    @property
    def latency_ms(self) -> float:
        return self.cycles / (self.clock_mhz * 1e3)

    @property
    def dram_bytes(self) -> int:
        return self.dram_read_bytes + self.dram_write_bytes

    def __add__(self, other: TimingReport) -> TimingReport:
        """Layers run one after another: cycles and counts add up."""
        merged = {k: v + getattr(other, k) for k, v in asdict(self).items() if k not in ("pes", "clock_mhz")}
        return TimingReport(**merged, pes=self.pes, clock_mhz=self.clock_mhz)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(pe_utilisation=self.pe_utilisation, latency_ms=self.latency_ms, dram_bytes=self.dram_bytes)
        return d


def _entry_bytes(config: AccelConfig, buffer: int) -> int:
    return {Buffer.INPUT: config.input_entry_bytes, Buffer.WEIGHT: config.weight_entry_bytes,
            Buffer.ACC: config.acc_entry_bytes}[Buffer(buffer)]


def instruction_cycles(inst: Instruction, config: AccelConfig) -> int:
    a = inst.args
    if inst.opcode in (Opcode.LOAD, Opcode.STORE):
        moved = a["y_size"] * a["x_size"] * _entry_bytes(config, a["buffer"])
        if moved == 0:
            return 1
        return config.dma_latency_cycles + math.ceil(moved / config.dram_bytes_per_cycle)
    if inst.opcode == Opcode.GEMM:
        return config.gemm_pipeline_cycles + _gemm_array_cycles(inst)
    if inst.opcode == Opcode.ALU:
        return max(1, a["out_blocks"] * a["pixels"])
    return 1


def _gemm_array_cycles(inst: Instruction) -> int:
    a = inst.args
    return a["out_blocks"] * a["in_blocks"] * a["kernel_h"] * a["kernel_w"] * a["out_h"] * a["out_w"]


def simulate_timing(program: list[Instruction], config: AccelConfig, macs: int = 0,
                    return_schedule: bool = False):
    """Cycle-level timeline of ``program``; with ``return_schedule`` also (start, end) per instruction."""
    queues: list[list[int]] = [[], [], []]
    for index, inst in enumerate(program):
        queues[inst.queue].append(index)
    # token FIFOs, keyed (from queue, to queue), holding the cycle each token was pushed
    fifos = {(Queue.LOAD, Queue.COMPUTE): deque(), (Queue.COMPUTE, Queue.LOAD): deque(),
             (Queue.COMPUTE, Queue.STORE): deque(), (Queue.STORE, Queue.COMPUTE): deque()}
    start = np.zeros(len(program), dtype=np.int64)
    end = np.zeros(len(program), dtype=np.int64)
    ptr, free, busy = [0, 0, 0], [0, 0, 0], [0, 0, 0]

    def neighbours(q: int, inst: Instruction) -> list[tuple[tuple, bool]]:
        """(fifo to pop from, wanted) and (fifo to push to, wanted) for each flag."""
        prev, nxt = q - 1, q + 1
        return [((prev, q), inst.pop_prev), ((nxt, q), inst.pop_next)], [((q, prev), inst.push_prev), ((q, nxt), inst.push_next)]

    remaining = len(program)
    while remaining:
        progressed = False
        for q in (Queue.LOAD, Queue.COMPUTE, Queue.STORE):
            while ptr[q] < len(queues[q]):
                index = queues[q][ptr[q]]
                inst = program[index]
                pops, pushes = neighbours(q, inst)
                for key, wanted in pops + pushes:
                    if wanted and key not in fifos:
                        raise DeadlockError(f"instruction {index} ({inst}) uses a token between queues {key} that do not neighbour")
                if any(wanted and not fifos[key] for key, wanted in pops):
                    break
                t0 = free[q]
                for key, wanted in pops:
                    if wanted:
                        t0 = max(t0, fifos[key].popleft())
                cost = instruction_cycles(inst, config)
                start[index], end[index] = t0, t0 + cost
                free[q] = t0 + cost
                busy[q] += cost
                for key, wanted in pushes:
                    if wanted:
                        fifos[key].append(t0 + cost)
                ptr[q] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [f"{Queue(q).name}: instruction {queues[q][ptr[q]]} ({program[queues[q][ptr[q]]]})"
                     for q in range(3) if ptr[q] < len(queues[q])]
            raise DeadlockError("the queues deadlock waiting for tokens: " + "; ".join(stuck))
    report = _counts(program, config, int(end.max(initial=0)), macs, busy)
    return (report, start, end) if return_schedule else report


def _counts(program: list[Instruction], config: AccelConfig, cycles: int, macs: int, busy: list[int]) -> TimingReport:
    read = write = inp_read = wgt_read = acc_access = pe_cycles = 0
    for inst in program:
        a = inst.args
        if inst.opcode == Opcode.LOAD:
            moved = a["y_size"] * a["x_size"] * _entry_bytes(config, a["buffer"])
            read += moved
            if a["buffer"] == Buffer.ACC:
                acc_access += moved
        elif inst.opcode == Opcode.STORE:
            moved = a["y_size"] * a["x_size"] * config.acc_entry_bytes
            write += moved
            acc_access += moved
        elif inst.opcode == Opcode.GEMM:
            cycles_here = _gemm_array_cycles(inst)
            pe_cycles += cycles_here
            inp_read += cycles_here * config.input_entry_bytes
            # weight-stationary inside the tile: each block enters the array once per GEMM
            wgt_read += a["out_blocks"] * a["in_blocks"] * a["kernel_h"] * a["kernel_w"] * config.weight_entry_bytes
            acc_access += 2 * cycles_here * config.acc_entry_bytes  # read-modify-write per cycle
        elif inst.opcode == Opcode.ALU:
            acc_access += 2 * a["out_blocks"] * a["pixels"] * config.acc_entry_bytes
    return TimingReport(cycles=cycles, macs=macs, pe_cycles=pe_cycles, load_busy=busy[0], compute_busy=busy[1],
                        store_busy=busy[2], dram_read_bytes=read, dram_write_bytes=write,
                        sram_input_read_bytes=inp_read, sram_weight_read_bytes=wgt_read,
                        sram_acc_access_bytes=acc_access, pes=config.pes, clock_mhz=config.clock_mhz)

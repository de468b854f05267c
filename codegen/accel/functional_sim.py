"""Bit-exact functional simulation of an accelerator program, vectorised per instruction.

It executes the instruction stream in program order on a DRAM image (uint8) and three SRAM
buffers. A GEMM computes its whole output tile at once: the shift-add array's
Σ x·(±2^e) equals the integer product sum, which numpy evaluates as one BLAS matrix
product and casts back to int32. That is exact: every partial sum is an integer bounded by
K·128·max|w| (K the reduction length); float32 is used when that bound is below 2^24,
float64 (bound below 2^53 for any tile the ISA can express) otherwise. BLAS runs on one
thread: these matrices are small and a shared machine's threads only contend. The
accumulator buffer wraps like int32 hardware does.
"""

from __future__ import annotations

import numpy as np

from lastbit.codegen.accel.compiler import AccelProgram, decode_fields, unpack_nibbles
from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.isa import AluOp, Buffer, Instruction, Opcode
from lastbit.errors import LastbitError

__all__ = ["FunctionalSimulator", "SimulationError", "run_layer"]


class SimulationError(LastbitError):
    """A program reads or writes outside a buffer or DRAM, or does not end with FINISH."""


class FunctionalSimulator:
    """The accelerator's state: input SRAM int8 [entries, cols], weight SRAM as decoded code
    values [entries, rows, cols], accumulator SRAM int32 [entries, rows]."""

    def __init__(self, config: AccelConfig):
        self.config = config
        self.inp = np.zeros((config.input_entries, config.cols), dtype=np.int8)
        self.wgt = np.zeros((config.weight_entries, config.rows, config.cols), dtype=np.int8)
        self.acc = np.zeros((config.acc_entries, config.rows), dtype=np.int32)
        self._max_weight = 64 if config.pe == "shift-add" else 128  # largest |code| the PE takes

    def run(self, program: list[Instruction], dram: np.ndarray) -> np.ndarray:
        """Execute ``program`` on ``dram`` (modified in place and returned)."""
        if not program or program[-1].opcode != Opcode.FINISH:
            raise SimulationError("program does not end with FINISH")
        handlers = {Opcode.LOAD: self._load, Opcode.STORE: self._store, Opcode.GEMM: self._gemm,
                    Opcode.ALU: self._alu, Opcode.FINISH: lambda inst, dram: None}
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            for index, inst in enumerate(program):
                try:
                    handlers[inst.opcode](inst, dram)
                except (IndexError, ValueError) as err:
                    raise SimulationError(f"instruction {index} ({inst}): {err}") from err
        return dram

    # -- DMA ---------------------------------------------------------------------------------
    def _dram_rows(self, dram: np.ndarray, inst: Instruction, entry_bytes: int) -> np.ndarray:
        """The y_size × x_size entries a LOAD/STORE addresses, as a [y, x, entry_bytes] view."""
        a = inst.args
        if a["y_size"] == 0 or a["x_size"] == 0:
            return dram[:0].reshape(0, 0, entry_bytes)
        end = a["dram_base"] + ((a["y_size"] - 1) * a["x_stride"] + a["x_size"]) * entry_bytes
        if end > dram.size:
            raise SimulationError(f"{inst.opcode.name} reads DRAM up to byte {end}, the image has {dram.size}")
        return np.lib.stride_tricks.as_strided(
            dram[a["dram_base"]:], shape=(a["y_size"], a["x_size"], entry_bytes),
            strides=(a["x_stride"] * entry_bytes, entry_bytes, 1), writeable=True)

    def _load(self, inst: Instruction, dram: np.ndarray) -> None:
        cfg, a = self.config, inst.args
        if a["buffer"] == Buffer.INPUT:
            rows = self._dram_rows(dram, inst, cfg.input_entry_bytes)
            h = a["pad_top"] + a["y_size"] + a["pad_bottom"]
            w = a["pad_left"] + a["x_size"] + a["pad_right"]
            tile = np.zeros((h, w, cfg.cols), dtype=np.int8)
            tile[a["pad_top"]:a["pad_top"] + a["y_size"], a["pad_left"]:a["pad_left"] + a["x_size"]] = rows.view(np.int8)
            self._write(self.inp, a["sram_base"], tile.reshape(h * w, cfg.cols))
        elif a["buffer"] == Buffer.WEIGHT:
            rows = self._dram_rows(dram, inst, cfg.weight_entry_bytes).reshape(-1)
            if cfg.pe == "mac8":
                values = rows.view(np.int8)
            else:
                values = decode_fields(unpack_nibbles(rows))
            self._write(self.wgt, a["sram_base"], values.reshape(-1, cfg.rows, cfg.cols))
        else:
            rows = np.ascontiguousarray(self._dram_rows(dram, inst, cfg.acc_entry_bytes))
            self._write(self.acc, a["sram_base"], rows.reshape(-1).view("<i4").reshape(-1, cfg.rows))

    def _store(self, inst: Instruction, dram: np.ndarray) -> None:
        cfg, a = self.config, inst.args
        count = a["y_size"] * a["x_size"]
        data = self._read(self.acc, a["sram_base"], count).astype("<i4")
        rows = self._dram_rows(dram, inst, cfg.acc_entry_bytes)
        rows[...] = data.view(np.uint8).reshape(rows.shape)

    @staticmethod
    def _write(buffer: np.ndarray, base: int, values: np.ndarray) -> None:
        if base + len(values) > len(buffer):
            raise SimulationError(f"write of {len(values)} entries at {base} overflows a {len(buffer)}-entry buffer")
        buffer[base:base + len(values)] = values

    @staticmethod
    def _read(buffer: np.ndarray, base: int, count: int) -> np.ndarray:
        if base + count > len(buffer):
            raise SimulationError(f"read of {count} entries at {base} overflows a {len(buffer)}-entry buffer")
        return buffer[base:base + count]

    # -- compute -----------------------------------------------------------------------------
    def _gemm(self, inst: Instruction, dram: np.ndarray) -> None:
        cfg, a = self.config, inst.args
        oh, ow, kh, kw = a["out_h"], a["out_w"], a["kernel_h"], a["kernel_w"]
        sh, sw, cbn, obn = a["stride_h"], a["stride_w"], a["in_blocks"], a["out_blocks"]
        in_h, in_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
        x = self._read(self.inp, a["inp_base"], cbn * in_h * in_w).reshape(cbn, in_h, in_w, cfg.cols)
        w = self._read(self.wgt, a["wgt_base"], obn * cbn * kh * kw).reshape(obn, cbn, kh, kw, cfg.rows, cfg.cols)
        # im2col: [pixels, (cbn, kh, kw, cols)] against [(cbn, kh, kw, cols), (obn, rows)]
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw][:, :oh, :ow]
        patches = windows.transpose(1, 2, 0, 4, 5, 3).reshape(oh * ow, cbn * kh * kw * cfg.cols)
        weights = w.transpose(1, 2, 3, 5, 0, 4).reshape(cbn * kh * kw * cfg.cols, obn * cfg.rows)
        exact_in = np.float32 if patches.shape[1] * 128 * self._max_weight < 1 << 24 else np.float64
        product = patches.astype(exact_in) @ weights.astype(exact_in)
        tile = product.astype(np.int64).reshape(oh * ow, obn, cfg.rows).transpose(1, 0, 2).reshape(obn * oh * ow, cfg.rows)
        dst = self._read(self.acc, a["acc_base"], obn * oh * ow)
        if a["reset"]:
            dst[...] = tile.astype(np.int32)
        else:
            dst[...] = (dst.astype(np.int64) + tile).astype(np.int32)  # wraps like int32 hardware

    def _alu(self, inst: Instruction, dram: np.ndarray) -> None:
        a = inst.args
        obn, pixels = a["out_blocks"], a["pixels"]
        dst = self._read(self.acc, a["dst_base"], obn * pixels).reshape(obn, pixels, -1)
        op, imm = AluOp(a["alu_op"]), np.int32(a["imm"])
        if op == AluOp.ADD_VEC:
            vec = self._read(self.acc, a["src_base"], obn)[:, None, :]
            dst[...] = (dst.astype(np.int64) + vec).astype(np.int32)
        elif op == AluOp.ADD_IMM:
            dst[...] = (dst.astype(np.int64) + int(imm)).astype(np.int32)
        elif op == AluOp.MAX_IMM:
            np.maximum(dst, imm, out=dst)
        elif op == AluOp.MIN_IMM:
            np.minimum(dst, imm, out=dst)
        elif op == AluOp.SHR_IMM:
            np.right_shift(dst, imm, out=dst)


def run_layer(program: AccelProgram, x_q: np.ndarray, bias_q: np.ndarray | None = None,
              simulator: FunctionalSimulator | None = None) -> np.ndarray:
    """int32 NCHW result of one compiled layer: (Σ x_q·codes + bias_q) [max 0]."""
    bias = np.zeros(program.layer.out_channels, np.int32) if bias_q is None else bias_q
    image = program.dram_image(x_q, bias)
    sim = simulator if simulator is not None and simulator.config == program.config else FunctionalSimulator(program.config)
    sim.run(program.instructions, image)
    return program.read_output(image)

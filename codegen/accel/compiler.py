"""Compile one quantized conv2d/dense layer (with its fused bias and ReLU) for the
accelerator: choose a tiling, emit the instruction stream, and lay out the DRAM image.

DRAM layouts (byte addresses, each region 64-byte aligned):
    input   int8  [N, Cb, H, W, cols]        channels zero-padded to Cb·cols
    weight  codes [Ob, Cb, KH, KW] blocks of rows×cols codes (4-bit sign+shift, or int8)
    bias    int32 [Ob, rows]
    output  int32 [N, Ob, OH, OW, rows]
SRAM (per buffer half, in entries): input [cbn, in_h, in_w], weight [obn, cbn, KH, KW],
accumulator [obn bias entries][obn, oh, ow].

A program is a sequence of *steps* (one GEMM over one input-channel tile of one output
tile); an output tile's last step is followed by the ALU epilogue and its STOREs. Step i
uses input/weight half i % 2 and skips a LOAD when that half already holds the data.
Tokens: load step i waits for compute step i−2 (compute→load), every GEMM waits for its
loads (load→compute), output tile g waits for the stores of tile g−2 (store→compute)
before it overwrites that accumulator half.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.isa import AluOp, Buffer, Instruction, Opcode
from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

__all__ = ["AccelCompileError", "AccelProgram", "ConvLayer", "Tiling", "compile_layer", "encode_weights",
           "schedule_layer", "tiling_candidates"]

_ALIGN = 64
_MAX_SHIFT = 6  # a 4-bit field: sign + 3-bit exponent e, value ±2^(e-1), e = 0 is zero


class AccelCompileError(LastbitError):
    """A layer cannot be mapped onto the accelerator (shape, codes or buffer sizes)."""


@dataclass(frozen=True)
class ConvLayer:
    """The accelerator's view of a layer: int8 NCHW input × OIHW codes → int32 NCHW.

    A dense layer x[M, K] @ W[N, K]^T is the 1×1 convolution of a [1, K, 1, M] image."""

    name: str
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    relu: bool = False

    @classmethod
    def dense(cls, name: str, m: int, k: int, n: int, relu: bool = False) -> ConvLayer:
        return cls(name, 1, k, 1, m, n, relu=relu)

    @property
    def out_h(self) -> int:
        return (self.height + self.padding[0] + self.padding[2] - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.width + self.padding[1] + self.padding[3] - self.kernel[1]) // self.stride[1] + 1

    @property
    def macs(self) -> int:
        return self.batch * self.out_channels * self.out_h * self.out_w * self.in_channels * self.kernel[0] * self.kernel[1]


@dataclass(frozen=True)
class Tiling:
    """The knobs of one layer's schedule: output tile (rows × cols of pixels), output-channel
    blocks and input-channel blocks per tile, and the loop order ("ws": output channels
    outermost, weights stay; "is": pixels outermost, inputs stay)."""

    tile_oh: int
    tile_ow: int
    tile_ob: int
    tile_cb: int
    order: str = "ws"


@dataclass(frozen=True)
class DramLayout:
    input: int
    weight: int
    bias: int
    output: int
    total: int


@dataclass
class AccelProgram:
    """A compiled layer: instructions, DRAM layout and the weight region packed at compile time."""

    layer: ConvLayer
    config: AccelConfig
    tiling: Tiling
    instructions: list[Instruction]
    dram: DramLayout
    weight_image: np.ndarray  # uint8, the weight region
    estimated_cycles: float = 0.0

    @property
    def in_blocks(self) -> int:
        return math.ceil(self.layer.in_channels / self.config.cols)

    @property
    def out_blocks(self) -> int:
        return math.ceil(self.layer.out_channels / self.config.rows)

    def dram_image(self, x_q: np.ndarray, bias_q: np.ndarray) -> np.ndarray:
        """The DRAM the accelerator starts from: input (int8 NCHW) and bias (int32 [O]) laid
        out beside the compiled weights; the output region is zero."""
        lay, cfg = self.layer, self.config
        x_q = np.asarray(x_q)
        want = (lay.batch, lay.in_channels, lay.height, lay.width)
        if x_q.shape != want or x_q.dtype != np.int8:
            raise AccelCompileError(f"{lay.name}: input must be int8 {want}, got {x_q.dtype} {x_q.shape}")
        image = np.zeros(self.dram.total, dtype=np.uint8)
        padded = np.zeros((lay.batch, self.in_blocks * cfg.cols, lay.height, lay.width), dtype=np.int8)
        padded[:, :lay.in_channels] = x_q
        blocked = padded.reshape(lay.batch, self.in_blocks, cfg.cols, lay.height, lay.width).transpose(0, 1, 3, 4, 2)
        inp = np.ascontiguousarray(blocked).view(np.uint8).reshape(-1)
        image[self.dram.input:self.dram.input + inp.size] = inp
        image[self.dram.weight:self.dram.weight + self.weight_image.size] = self.weight_image
        bias = np.zeros(self.out_blocks * cfg.rows, dtype="<i4")
        bias[:lay.out_channels] = np.asarray(bias_q, dtype=np.int32).reshape(-1)
        image[self.dram.bias:self.dram.bias + bias.nbytes] = bias.view(np.uint8)
        return image

    def read_output(self, image: np.ndarray) -> np.ndarray:
        """The int32 NCHW result from the output region of a DRAM image."""
        lay, cfg = self.layer, self.config
        shape = (lay.batch, self.out_blocks, lay.out_h, lay.out_w, cfg.rows)
        count = int(np.prod(shape))
        raw = image[self.dram.output:self.dram.output + 4 * count].view("<i4").reshape(shape)
        out = raw.transpose(0, 1, 4, 2, 3).reshape(lay.batch, self.out_blocks * cfg.rows, lay.out_h, lay.out_w)
        return np.ascontiguousarray(out[:, :lay.out_channels]).astype(np.int32)


# --- weights ---------------------------------------------------------------------------------


def encode_weights(codes: np.ndarray, config: AccelConfig) -> np.ndarray:
    """Pack OIHW int8 codes into the weight region: [Ob, Cb, KH, KW] blocks of rows×cols.

    shift-add PE: each code is a 4-bit field, bit 3 the sign and bits 0-2 e, value ±2^(e-1)
    (e = 0: zero), two per byte, low nibble first. mac8 PE: the int8 codes as they are."""
    codes = np.asarray(codes)
    o, c, kh, kw = codes.shape
    ob, cb = math.ceil(o / config.rows), math.ceil(c / config.cols)
    full = np.zeros((ob * config.rows, cb * config.cols, kh, kw), dtype=np.int8)
    full[:o, :c] = codes
    blocks = full.reshape(ob, config.rows, cb, config.cols, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    blocks = np.ascontiguousarray(blocks).reshape(-1)
    if config.pe == "mac8":
        return blocks.view(np.uint8).copy()
    return _pack_nibbles(pow2_fields(blocks))


def pow2_fields(codes: np.ndarray) -> np.ndarray:
    """The 4-bit sign+shift field of each code; raises naming a code that is not 0 or ±2^k, k ≤ 6."""
    codes = np.asarray(codes, dtype=np.int32)
    mag = np.abs(codes)
    exp = np.zeros_like(mag)
    nonzero = mag > 0
    exp[nonzero] = np.log2(mag[nonzero]).astype(np.int32)
    bad = nonzero & ((1 << exp) != mag) | (exp > _MAX_SHIFT)
    if bad.any():
        raise AccelCompileError(f"weight code {int(codes[bad][0])} is not 0 or ±2^k with k ≤ {_MAX_SHIFT}; "
                                "the shift-add PE takes power-of-two codes only")
    field = np.where(nonzero, exp + 1, 0) | np.where(codes < 0, 8, 0)
    return field.astype(np.uint8)


def decode_fields(fields: np.ndarray) -> np.ndarray:
    """4-bit fields back to code values (what a shift-add PE applies: ±(x << e-1))."""
    fields = np.asarray(fields, dtype=np.int32)
    e = fields & 7
    mag = np.where(e > 0, 1 << np.maximum(e - 1, 0), 0)
    return np.where(fields & 8, -mag, mag).astype(np.int8)


def _pack_nibbles(fields: np.ndarray) -> np.ndarray:
    if fields.size % 2:
        fields = np.append(fields, 0)
    pairs = fields.reshape(-1, 2).astype(np.uint8)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8)


def unpack_nibbles(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    return np.stack([data & 0xF, data >> 4], axis=-1).reshape(-1)


# --- tiling ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _distinct_tiles(extent: int, limit: int = 255) -> tuple[int, ...]:
    """Tile sizes that give distinct tile counts: ceil(extent / k) for k = 1 .. extent."""
    return tuple(sorted({math.ceil(extent / k) for k in range(1, extent + 1) if math.ceil(extent / k) <= limit}))


def _fits(layer: ConvLayer, cfg: AccelConfig, t: Tiling) -> bool:
    kh, kw = layer.kernel
    in_h = (t.tile_oh - 1) * layer.stride[0] + kh
    in_w = (t.tile_ow - 1) * layer.stride[1] + kw
    return (t.tile_cb * in_h * in_w <= cfg.input_entries // 2
            and t.tile_ob * t.tile_cb * kh * kw <= cfg.weight_entries // 2
            and t.tile_ob * t.tile_cb * kh * kw <= 1023
            and t.tile_ob * (t.tile_oh * t.tile_ow + 1) <= cfg.acc_entries // 2
            and in_h <= 1023 and in_w <= 1023 and t.tile_oh * t.tile_ow < 1 << 16)


def tiling_candidates(layer: ConvLayer, cfg: AccelConfig) -> list[Tiling]:
    """Every tiling the buffers hold: output-tile shapes × input-channel tiles × loop order,
    each with the most output-channel blocks that still fit (more blocks, more input reuse)."""
    ob = math.ceil(layer.out_channels / cfg.rows)
    cb = math.ceil(layer.in_channels / cfg.cols)
    found = []
    ob_tiles = _distinct_tiles(ob)[::-1]  # largest first
    for oh, ow, tcb in itertools.product(_distinct_tiles(layer.out_h), _distinct_tiles(layer.out_w),
                                         _distinct_tiles(cb)):
        tob = next((b for b in ob_tiles if _fits(layer, cfg, Tiling(oh, ow, b, tcb))), None)
        if tob is None:
            continue
        found += [Tiling(oh, ow, tob, tcb, order) for order in ("ws", "is")]
    return found


def estimate_cost(layer: ConvLayer, cfg: AccelConfig, t: Tiling) -> tuple[float, float]:
    """Closed-form (cycles, DRAM bytes) used to rank tilings: the busiest of the three queues
    (they overlap) plus the first load and the last store; the bytes every DMA moves."""
    kh, kw = layer.kernel
    ob, cb = math.ceil(layer.out_channels / cfg.rows), math.ceil(layer.in_channels / cfg.cols)
    n_sp = layer.batch * math.ceil(layer.out_h / t.tile_oh) * math.ceil(layer.out_w / t.tile_ow)
    n_co, n_ci = math.ceil(ob / t.tile_ob), math.ceil(cb / t.tile_cb)
    steps = n_sp * n_co * n_ci
    in_h = (t.tile_oh - 1) * layer.stride[0] + kh
    in_w = (t.tile_ow - 1) * layer.stride[1] + kw
    real_h, real_w = min(in_h, layer.height), min(in_w, layer.width)
    inp_tile = real_h * real_w * cfg.input_entry_bytes  # one channel block of one spatial tile
    inp_loads = n_sp * cb * (min(n_co, 2) if (t.order == "is" and n_ci == 1) else n_co)
    weight_bytes = ob * cb * kh * kw * cfg.weight_entry_bytes
    stays = (n_ci == 1) and (t.order == "ws" or n_co == 1)
    wgt_bytes = weight_bytes * (min(n_sp, 2) if stays else n_sp)
    out_bytes = layer.batch * layer.out_h * layer.out_w * ob * cfg.acc_entry_bytes
    bw = cfg.dram_bytes_per_cycle
    load = (inp_loads * inp_tile + wgt_bytes) / bw + (inp_loads + steps) * cfg.dma_latency_cycles
    compute = layer.batch * layer.out_h * layer.out_w * ob * cb * kh * kw + steps * (cfg.gemm_pipeline_cycles + 1)
    store = out_bytes / bw + n_sp * ob * cfg.dma_latency_cycles
    first = cfg.dma_latency_cycles + (t.tile_cb * inp_tile + t.tile_ob * t.tile_cb * kh * kw * cfg.weight_entry_bytes) / bw
    last = cfg.dma_latency_cycles + t.tile_ob * t.tile_oh * t.tile_ow * cfg.acc_entry_bytes / bw
    return max(load, compute, store) + first + last, inp_loads * inp_tile + wgt_bytes + out_bytes


def estimate_cycles(layer: ConvLayer, cfg: AccelConfig, t: Tiling) -> float:
    return estimate_cost(layer, cfg, t)[0]


def choose_tiling(layer: ConvLayer, cfg: AccelConfig, slack: float = 0.01) -> tuple[Tiling, float]:
    """The fastest tiling by the estimate; among those within ``slack`` of it, the one that
    moves the fewest DRAM bytes (DRAM dominates the energy)."""
    candidates = tiling_candidates(layer, cfg)
    if not candidates:
        raise AccelCompileError(f"{layer.name}: no tiling of {layer} fits the buffers of accelerator '{cfg.name}'")
    scored = [(*estimate_cost(layer, cfg, t), t) for t in candidates]
    fastest = min(cycles for cycles, _, _ in scored)
    near = [s for s in scored if s[0] <= fastest * (1 + slack)]
    best = min(near, key=lambda s: (s[1], s[0]))
    return best[2], best[0]


# --- code generation -------------------------------------------------------------------------


def check_layer(layer: ConvLayer) -> None:
    kh, kw = layer.kernel
    problems = []
    if not (1 <= kh <= 15 and 1 <= kw <= 15):
        problems.append(f"kernel {layer.kernel} (1..15)")
    if not all(1 <= s <= 7 for s in layer.stride):
        problems.append(f"stride {layer.stride} (1..7)")
    if not all(0 <= p <= 15 for p in layer.padding):
        problems.append(f"padding {layer.padding} (0..15)")
    if layer.padding[0] >= kh or layer.padding[2] >= kh or layer.padding[1] >= kw or layer.padding[3] >= kw:
        problems.append(f"padding {layer.padding} not smaller than the kernel {layer.kernel}")
    if layer.height + layer.padding[0] + layer.padding[2] < kh or layer.width + layer.padding[1] + layer.padding[3] < kw:
        problems.append("kernel larger than the padded input")
    if problems:
        raise AccelCompileError(f"{layer.name}: unsupported geometry: {', '.join(problems)}")


def compile_layer(layer: ConvLayer, codes: np.ndarray, config: AccelConfig, tiling: Tiling | None = None) -> AccelProgram:
    """The program for one layer: ``codes`` OIHW int8 (for dense, [N, K] or [N, K, 1, 1])."""
    check_layer(layer)
    codes = np.asarray(codes)
    if codes.ndim == 2:
        codes = codes[:, :, None, None]
    want = (layer.out_channels, layer.in_channels, *layer.kernel)
    if codes.shape != want:
        raise AccelCompileError(f"{layer.name}: codes have shape {codes.shape}, the layer needs {want}")
    weights = encode_weights(codes, config)
    tiling, estimate, dram, instructions = schedule_layer(layer, config, tiling)
    if dram.bias - dram.weight < weights.size:  # schedule_layer sizes the region from the geometry
        raise AccelCompileError(f"{layer.name}: encoded weights take {weights.size} B, the layout reserves "
                                f"{dram.bias - dram.weight} B")
    log.debug("%s: tiling %s, %d instructions, estimate %.0f cycles", layer.name, tiling, len(instructions), estimate)
    return AccelProgram(layer, config, tiling, instructions, dram, weights, estimated_cycles=estimate)


def schedule_layer(layer: ConvLayer, config: AccelConfig, tiling: Tiling | None = None
                   ) -> tuple[Tiling, float, DramLayout, list[Instruction]]:
    """Tiling, estimate, DRAM layout and instruction stream of a layer, without its weights:
    the schedule depends on the geometry only, so cost models (``dse.layer_cost``) skip
    encoding the codes. ``compile_layer`` is this plus the packed weight region."""
    check_layer(layer)
    if tiling is None:
        tiling, estimate = choose_tiling(layer, config)
    else:
        if not _fits(layer, config, tiling):
            raise AccelCompileError(f"{layer.name}: tiling {tiling} does not fit accelerator '{config.name}'")
        estimate = estimate_cycles(layer, config, tiling)
    kh, kw = layer.kernel
    ob, cb = math.ceil(layer.out_channels / config.rows), math.ceil(layer.in_channels / config.cols)
    sizes = [layer.batch * cb * layer.height * layer.width * config.cols, ob * cb * kh * kw * config.weight_entry_bytes,
             ob * config.acc_entry_bytes, layer.batch * ob * layer.out_h * layer.out_w * config.acc_entry_bytes]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // _ALIGN) * _ALIGN
    dram = DramLayout(*offsets, total=at)
    return tiling, estimate, dram, _emit(layer, config, tiling, dram)


def _emit(layer: ConvLayer, cfg: AccelConfig, t: Tiling, dram: DramLayout) -> list[Instruction]:
    kh, kw = layer.kernel
    sh, sw = layer.stride
    pt, pl = layer.padding[0], layer.padding[1]
    ob, cb = math.ceil(layer.out_channels / cfg.rows), math.ceil(layer.in_channels / cfg.cols)
    oh_all, ow_all = layer.out_h, layer.out_w
    inp_half, wgt_half, acc_half = cfg.input_entries // 2, cfg.weight_entries // 2, cfg.acc_entries // 2
    spatial = [(n, y, min(t.tile_oh, oh_all - y), x, min(t.tile_ow, ow_all - x))
               for n in range(layer.batch) for y in range(0, oh_all, t.tile_oh) for x in range(0, ow_all, t.tile_ow)]
    co_tiles = [(o, min(t.tile_ob, ob - o)) for o in range(0, ob, t.tile_ob)]
    ci_tiles = [(c, min(t.tile_cb, cb - c)) for c in range(0, cb, t.tile_cb)]
    if t.order == "ws":
        groups = [(co, sp) for co in co_tiles for sp in spatial]
    else:
        groups = [(co, sp) for sp in spatial for co in co_tiles]
    wgt_entry_bytes, inp_entry_bytes = cfg.weight_entry_bytes, cfg.input_entry_bytes
    resident: list[list] = [[None, None], [None, None]]  # per half: (input key, weight key)
    prog: list[Instruction] = []
    step = 0
    for g, ((o0, obn), (n, y0, oh, x0, ow)) in enumerate(groups):
        acc_slot = (g % 2) * acc_half
        acc_tile = acc_slot + obn
        in_h, in_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
        iy0, ix0 = y0 * sh - pt, x0 * sw - pl
        top, left = max(0, -iy0), max(0, -ix0)
        bottom, right = max(0, iy0 + in_h - layer.height), max(0, ix0 + in_w - layer.width)
        real_h, real_w = in_h - top - bottom, in_w - left - right
        for s, (c0, cbn) in enumerate(ci_tiles):
            half = step % 2
            loads: list[Instruction] = []
            inp_key, wgt_key = (n, y0, x0, c0, cbn), (o0, obn, c0, cbn)
            if resident[half][0] != inp_key:
                for b in range(cbn):
                    src = dram.input + (((n * cb + c0 + b) * layer.height + iy0 + top) * layer.width + ix0 + left) * inp_entry_bytes
                    loads.append(Instruction(Opcode.LOAD, dict(
                        buffer=Buffer.INPUT, sram_base=half * inp_half + b * in_h * in_w, dram_base=src,
                        y_size=real_h, x_size=real_w, x_stride=layer.width,
                        pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right)))
                resident[half][0] = inp_key
            if resident[half][1] != wgt_key:
                row = cb * kh * kw
                loads.append(Instruction(Opcode.LOAD, dict(
                    buffer=Buffer.WEIGHT, sram_base=half * wgt_half,
                    dram_base=dram.weight + (o0 * row + c0 * kh * kw) * wgt_entry_bytes,
                    y_size=obn, x_size=cbn * kh * kw, x_stride=row)))
                resident[half][1] = wgt_key
            if not loads:  # both halves hold the data: an empty LOAD still passes the tokens
                loads.append(Instruction(Opcode.LOAD, dict(buffer=Buffer.INPUT, sram_base=half * inp_half)))
            loads[0].pop_next = step >= 2
            loads[-1].push_next = True
            prog += loads
            if s == 0:
                prog.append(Instruction(Opcode.LOAD, dict(
                    buffer=Buffer.ACC, sram_base=acc_slot, dram_base=dram.bias + o0 * cfg.acc_entry_bytes,
                    y_size=1, x_size=obn, x_stride=obn), pop_next=g >= 2))
            prog.append(Instruction(Opcode.GEMM, dict(
                reset=int(s == 0), acc_base=acc_tile, inp_base=half * inp_half, wgt_base=half * wgt_half,
                out_h=oh, out_w=ow, kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw,
                in_blocks=cbn, out_blocks=obn), pop_prev=True, push_prev=True))
            step += 1
        epilogue = [Instruction(Opcode.ALU, dict(alu_op=AluOp.ADD_VEC, dst_base=acc_tile, src_base=acc_slot,
                                                 out_blocks=obn, pixels=oh * ow))]
        if layer.relu:
            epilogue.append(Instruction(Opcode.ALU, dict(alu_op=AluOp.MAX_IMM, dst_base=acc_tile,
                                                         out_blocks=obn, pixels=oh * ow, imm=0)))
        epilogue[-1].push_next = True
        prog += epilogue
        stores = []
        for b in range(obn):
            dst = dram.output + (((n * ob + o0 + b) * oh_all + y0) * ow_all + x0) * cfg.acc_entry_bytes
            stores.append(Instruction(Opcode.STORE, dict(buffer=Buffer.ACC, sram_base=acc_tile + b * oh * ow,
                                                         dram_base=dst, y_size=oh, x_size=ow, x_stride=ow_all)))
        stores[0].pop_prev = True
        stores[-1].push_prev = True
        prog += stores
    prog.append(Instruction(Opcode.FINISH))
    return prog

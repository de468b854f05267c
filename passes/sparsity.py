"""Unstructured sparsity and the compact storage that makes it pay: the smallest weights of
each conv/dense layer are set to zero, and the report stores every weight tensor in the
cheapest of three encodings of its codes (or float values):

* ``dense``  — n·b bits, zeros included;
* ``bitmap`` — one presence bit per weight plus b bits per nonzero;
* ``rle``    — relative-index run-length (Han et al., Deep Compression): per nonzero the
  number of zeros before it in k bits and its value in b bits; a gap of 2^k or more costs
  filler entries (gap 2^k−1, value zero). k is chosen per tensor (1..8).

Combined with power-of-two codes this gives seed 000's figure: sparsity + b-bit codes →
compression ratio against fp32. The pruning criterion is magnitude, optionally boosted by
the gradient (|w|·(1 + |g|/mean|g|)), so a small weight the loss is sensitive to survives.
The arithmetic and the encoder/decoder are plain numpy; :class:`Sparsify` is the pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastbit.errors import LastbitError
from lastbit.graph import Graph

log = logging.getLogger(__name__)

__all__ = [
    "Encoding",
    "Sparsify",
    "SparsityError",
    "TensorStorage",
    "best_encoding",
    "decode_rle",
    "encode_rle",
    "magnitude_mask",
    "rle_entries",
    "storage_table",
]

MAX_INDEX_BITS = 8


class SparsityError(LastbitError):
    """A sparsity setting is invalid (a ratio outside [0, 1))."""


# --- pruning -----------------------------------------------------------------------------------


def magnitude_mask(weight: np.ndarray, sparsity: float, grad: np.ndarray | None = None) -> np.ndarray:
    """A keep-mask zeroing exactly ⌊sparsity·n⌋ weights with the lowest score: |w|, or
    |w|·(1 + |g|/mean|g|) with a gradient."""
    if not 0 <= sparsity < 1:
        raise SparsityError(f"sparsity must be in [0, 1), got {sparsity!r}")
    score = np.abs(np.asarray(weight, dtype=np.float64)).ravel()
    if grad is not None:
        g = np.abs(np.asarray(grad, dtype=np.float64)).ravel()
        score = score * (1.0 + g / max(float(g.mean()), 1e-30))
    k = math.floor(sparsity * score.size)
    keep = np.ones(score.size, dtype=bool)
    if k:
        keep[np.argpartition(score, k - 1)[:k]] = False
    return keep.reshape(np.shape(weight))


# --- storage -----------------------------------------------------------------------------------


def rle_entries(nonzero: np.ndarray, index_bits: int) -> int:
    """Entries of the relative-index encoding of a flat 0/1 (zero/nonzero) pattern: one per
    nonzero plus ⌊gap / 2^k⌋ fillers for each gap of zeros before it (trailing zeros are free:
    the element count is stored once)."""
    positions = np.flatnonzero(np.asarray(nonzero).ravel())
    if positions.size == 0:
        return 0
    gaps = np.diff(positions, prepend=-1) - 1
    return int(positions.size + (gaps >> index_bits).sum())


def encode_rle(symbols: np.ndarray, value_bits: int, index_bits: int) -> bytes:
    """The relative-index encoding of ``symbols`` (ints in [0, 2^value_bits), 0 = zero) as
    packed bits: per entry ``index_bits`` of gap then ``value_bits`` of value, MSB first."""
    flat = np.asarray(symbols, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << value_bits):
        raise SparsityError(f"symbols must be in [0, {1 << value_bits}) for {value_bits}-bit values")
    cap = (1 << index_bits) - 1
    gaps, values = [], []
    run = 0
    for v in flat.tolist():
        if v == 0:
            run += 1
            continue
        while run > cap:
            gaps.append(cap)
            values.append(0)
            run -= cap + 1
        gaps.append(run)
        values.append(v)
        run = 0
    fields = np.zeros((len(gaps), index_bits + value_bits), dtype=np.uint8)
    g, val = np.array(gaps, dtype=np.int64), np.array(values, dtype=np.int64)
    for bit in range(index_bits):
        fields[:, bit] = (g >> (index_bits - 1 - bit)) & 1
    for bit in range(value_bits):
        fields[:, index_bits + bit] = (val >> (value_bits - 1 - bit)) & 1
    return np.packbits(fields.ravel()).tobytes()


def decode_rle(data: bytes, count: int, value_bits: int, index_bits: int) -> np.ndarray:
    """Inverse of :func:`encode_rle` for a tensor of ``count`` symbols."""
    width = index_bits + value_bits
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    n_entries = len(bits) // width
    out = np.zeros(count, dtype=np.int64)
    weights_idx = 1 << np.arange(index_bits - 1, -1, -1)
    weights_val = 1 << np.arange(value_bits - 1, -1, -1)
    pos = 0
    for e in range(n_entries):
        field = bits[e * width:(e + 1) * width].astype(np.int64)
        gap, value = int(field[:index_bits] @ weights_idx), int(field[index_bits:] @ weights_val)
        pos += gap
        if pos >= count:  # packing pad at the end (a partial entry of zero bits)
            break
        out[pos] = value
        pos += 1
    return out


@dataclass(frozen=True)
class Encoding:
    """How one tensor is stored: the scheme, its index width (rle) and its size."""

    scheme: str  # "dense", "bitmap" or "rle"
    size_bits: int
    index_bits: int = 0

    @property
    def size_bytes(self) -> int:
        return math.ceil(self.size_bits / 8)


def best_encoding(values: np.ndarray, value_bits: int) -> Encoding:
    """The smallest of dense, bitmap and rle (k = 1..8) for ``values`` at ``value_bits`` each."""
    flat = np.asarray(values).ravel()
    n, nonzero = flat.size, flat != 0
    nnz = int(nonzero.sum())
    options = [Encoding("dense", n * value_bits), Encoding("bitmap", n + nnz * value_bits)]
    for k in range(1, MAX_INDEX_BITS + 1):
        options.append(Encoding("rle", rle_entries(nonzero, k) * (k + value_bits), k))
    return min(options, key=lambda e: (e.size_bits, e.scheme != "dense"))


@dataclass(frozen=True)
class TensorStorage:
    """One weight tensor as stored: its values' width, sparsity and encoding."""

    param: str
    count: int
    nonzero: int
    value_bits: int
    encoding: Encoding
    overhead_bytes: int = 0  # α scales of a quantized weight

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.count if self.count else 0.0

    @property
    def size_bytes(self) -> int:
        return self.encoding.size_bytes + self.overhead_bytes


def storage_table(graph: Graph) -> list[TensorStorage]:
    """Every parameter of ``graph`` in its cheapest encoding: quantized weights as their codes
    at the code width (+ α), other float tensors at 32 bits. α tensors are folded into their
    weight's row; the fp32 reference size is 4 bytes per parameter counted here."""
    codes_info = {info.codes_param: info for info in graph.quant.values()}
    alphas = {info.alpha_param for info in graph.quant.values()}
    table = []
    for name, value in graph.params.items():
        if name in alphas:
            continue
        info = codes_info.get(name)
        bits = info.bits if info else 8 * value.itemsize
        overhead = graph.params[info.alpha_param].nbytes if info else 0
        table.append(TensorStorage(name, int(value.size), int(np.count_nonzero(value)), bits,
                                   best_encoding(value, bits), overhead))
    return table


# --- the pass ----------------------------------------------------------------------------------


class Sparsify:
    """Graph -> Graph: zero the lowest-scoring ``sparsity`` share of every conv/dense weight.

    With a torch module and labelled data the score is boosted by the mean |∂L/∂w| over a
    few batches (mapped through ``source_names``); without, it is |w|.
    """

    def __init__(self, sparsity: float, torch_module=None, data: Any = None, batch_size: int = 64,
                 max_batches: int = 8):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise SparsityError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.torch_module = torch_module
        self.data = data
        self.batch_size = batch_size
        self.max_batches = max_batches

    def __call__(self, graph: Graph) -> Graph:
        from lastbit.passes.quantize_pow2 import weighted_layers

        weights = {layer.weight for layer in weighted_layers(graph) if not layer.unsupported
                   and layer.weight not in {i.codes_param for i in graph.quant.values()}}
        grads = self._gradients(graph, weights) if self.torch_module is not None and self.data is not None else {}
        params = dict(graph.params)
        for name in weights:
            mask = magnitude_mask(params[name], self.sparsity, grads.get(name))
            params[name] = np.where(mask, params[name], 0).astype(params[name].dtype)
        total = sum(params[n].size for n in weights)
        zeros = sum(int((params[n] == 0).sum()) for n in weights)
        log.info("%s: %d weight tensors %.1f%% zero (%s)", graph.name, len(weights), 100 * zeros / max(total, 1),
                 "magnitude+gradient" if grads else "magnitude")
        return graph.replace(params=params)

    def _gradients(self, graph: Graph, weights: set[str]) -> dict[str, np.ndarray]:
        """Mean |∂L/∂w| of cross-entropy over up to ``max_batches`` batches, per graph weight."""
        import torch

        from lastbit.passes.prune_channels import _labels
        from lastbit.passes.quantize_pow2 import calibration_inputs

        module = self.torch_module
        named = dict(module.named_parameters())
        tied = {n: named[graph.source_names[n]] for n in weights if graph.source_names.get(n) in named}
        x = calibration_inputs(self.data, self.batch_size * self.max_batches)
        y = _labels(self.data, len(x))
        sums = {n: np.zeros(graph.params[n].shape) for n in tied}
        was_training = module.training
        module.eval()
        try:
            for start in range(0, len(x), self.batch_size):
                module.zero_grad()
                xb = torch.as_tensor(np.asarray(x[start:start + self.batch_size], dtype=np.float32))
                yb = torch.as_tensor(np.asarray(y[start:start + self.batch_size])).long()
                torch.nn.functional.cross_entropy(module(xb), yb).backward()
                for n, p in tied.items():
                    if p.grad is not None and tuple(p.grad.shape) == sums[n].shape:
                        sums[n] += np.abs(p.grad.double().numpy())
        finally:
            module.zero_grad()
            module.train(was_training)
        return sums

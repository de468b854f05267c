"""Low-rank splitting as a graph rewrite: a dense layer x·M (M is K×N) becomes (x·A)·B with A
K×r and B r×N from a truncated SVD; a k×k conv becomes a k×k conv with r filters followed by a
1×1 conv, or (``conv_mode="separable"``) a k×1 conv with r filters followed by a 1×k conv
(Tai et al. 2016).

The rank comes from an energy threshold (the smallest r keeping that share of Σσ²) or a FLOP
budget per layer; a layer is left alone when its FLOPs would not drop (1×1 convs, small
layers, ranks near full). At full rank the split reproduces the layer exactly (up to float
rounding). The SVD math is plain numpy (``split_dense``, ``split_conv``, ``split_conv_separable``,
``rank_for_energy``); :class:`LowRank` is the Relax rewrite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastbit.errors import LastbitError
from lastbit.graph import Graph

log = logging.getLogger(__name__)

__all__ = [
    "LowRank",
    "LowRankError",
    "LowRankSplit",
    "parse_rank",
    "rank_for_energy",
    "split_conv",
    "split_conv_separable",
    "split_dense",
]

AUTO_ENERGY = 0.9  # "auto": keep 90% of the squared singular values
MIN_LAYER_PARAMS = 4096  # smaller layers are not worth two kernels
MAX_FLOP_SHARE = 0.8  # split only when the two halves cost at most this share of the layer
CONV_MODES = ("kxk-1x1", "separable")
RANK_ROUND_TO = 8  # ranks are whole SIMD channel blocks: the hidden layer is r channels wide


class LowRankError(LastbitError):
    """A low-rank setting is invalid (energy out of range, unknown mode)."""


# --- numpy -----------------------------------------------------------------------------------


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """The smallest r whose first r singular values hold ``energy`` of Σσ²."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    if total == 0:
        return 1
    return int(min(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1, len(s2)))


def _factor(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """m ≈ a @ b with a [rows, rank], b [rank, cols]; √σ on each side keeps them balanced."""
    u, s, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def split_dense(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """x @ m (m is K×N) ≈ (x @ a) @ b with a K×rank and b rank×N."""
    return _factor(m, rank)


def split_conv(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """An O×I×kh×kw filter bank ≈ a rank×I×kh×kw conv followed by an O×rank×1×1 conv."""
    o = w.shape[0]
    a, b = _factor(w.reshape(o, -1), rank)  # a: O×r, b: r×(I·kh·kw)
    return b.reshape(rank, *w.shape[1:]), a.reshape(o, rank, 1, 1)


def split_conv_separable(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """An O×I×kh×kw filter bank ≈ a rank×I×kh×1 (vertical) conv followed by an O×rank×1×kw
    (horizontal) conv: the SVD of w arranged as (I·kh)×(O·kw)."""
    o, i, kh, kw = w.shape
    a, b = _factor(w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw), rank)  # a: (I·kh)×r, b: r×(O·kw)
    vertical = a.reshape(i, kh, rank).transpose(2, 0, 1)[..., None]
    horizontal = b.reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(vertical), np.ascontiguousarray(horizontal)


def parse_rank(spec: Any) -> LowRank:
    """"auto" (energy 0.9), an energy in (0, 1], "flops:F" (each layer at most F of its FLOPs)
    or an int (a fixed rank, capped at full)."""
    if isinstance(spec, LowRank):
        return spec
    if isinstance(spec, bool):
        raise LowRankError(f"rank must be 'auto', an energy in (0, 1], 'flops:F' or an int, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise LowRankError(f"a fixed rank must be ≥ 1, got {spec}")
        return LowRank(rank=spec)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            return LowRank(energy=AUTO_ENERGY)
        if text.startswith("flops:"):
            try:
                f = float(text.split(":", 1)[1])
            except ValueError:
                f = -1.0
            if not 0 < f < 1:
                raise LowRankError(f"rank {spec!r}: the FLOP budget F in flops:F must be in (0, 1)")
            return LowRank(flops=f)
        try:
            spec = float(text)
        except ValueError:
            raise LowRankError(f"rank must be 'auto', an energy in (0, 1], 'flops:F' or an int, got {spec!r}") from None
    energy = float(spec)
    if not 0 < energy <= 1:
        raise LowRankError(f"low-rank energy must be in (0, 1], got {spec!r}")
    return LowRank(energy=energy)


# --- the pass --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankSplit:
    """One layer the pass split (or considered): its rank and FLOPs before/after."""

    layer: str  # source name without ".weight"
    kind: str
    full_rank: int
    rank: int
    flops_before: int
    flops_after: int
    skipped: str = ""  # why it was left alone ('' when split)


class LowRank:
    """Graph -> Graph: split dense and k×k conv layers into two low-rank layers.

    Exactly one of ``energy``, ``flops`` (per-layer FLOP budget), ``rank`` (fixed) or ``ranks``
    ({layer: rank}, per layer, from ``Squeeze(layers=...)``) picks the rank (rounded to
    multiples of ``round_to``, the SIMD width in floats, except a fixed rank);
    ``min_params`` and ``max_flop_share`` decide which layers are worth it, except for the
    layers ``ranks`` names: those are split as asked (only the named ones). ``splits``
    lists every layer considered afterwards (the report's per-layer FLOPs before/after).
    """

    def __init__(self, energy: float | None = None, flops: float | None = None, rank: int | None = None,
                 conv_mode: str = "kxk-1x1", min_params: int = MIN_LAYER_PARAMS,
                 max_flop_share: float = MAX_FLOP_SHARE, round_to: int = RANK_ROUND_TO,
                 ranks: "dict[str, int] | None" = None):
        if sum(v is not None for v in (energy, flops, rank, ranks)) != 1:
            raise LowRankError("give exactly one of energy, flops, rank or ranks")
        for layer, r in (ranks or {}).items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise LowRankError(f"layer {layer!r}: rank must be an int ≥ 1, got {r!r}")
        self.ranks = dict(ranks) if ranks is not None else None
        if conv_mode not in CONV_MODES:
            raise LowRankError(f"unknown conv_mode {conv_mode!r}; known: {', '.join(CONV_MODES)}")
        self.energy, self.flops, self.rank = energy, flops, rank
        self.conv_mode = conv_mode
        self.min_params = min_params
        self.max_flop_share = max_flop_share
        self.round_to = round_to
        self.splits: list[LowRankSplit] = []

    def _choose_rank(self, s: np.ndarray, flops: int, per_rank: int, name: str = "") -> int:
        if self.ranks is not None:
            return min(self.ranks[name], len(s))
        if self.rank is not None:
            return min(self.rank, len(s))
        step = max(1, self.round_to)
        if self.energy is not None:  # up to a whole SIMD channel block (see prune_channels.ROUND_TO)
            r = rank_for_energy(s, self.energy)
            return min(len(s), -(-r // step) * step)
        r = max(1, min(int(self.flops * flops // per_rank), len(s)))
        if r >= step:
            return r - r % step  # within the budget
        return 1 << (r.bit_length() - 1)  # below one block: a power of two still vectorizes

    def __call__(self, graph: Graph) -> Graph:
        from lastbit.passes.flops import layer_flops
        from lastbit.passes.quantize_pow2 import weighted_layers

        layers = weighted_layers(graph)
        uses: dict[str, int] = {}
        for layer in layers:
            uses[layer.weight] = uses.get(layer.weight, 0) + 1
        plan: dict[str, tuple] = {}  # layer var name -> (layer, new params…)
        self.splits = []
        for layer in layers:
            decision = self._plan_layer(graph, layer, uses[layer.weight])
            self.splits.append(decision[0])
            if decision[1] is not None:
                plan[layer.var] = (layer, *decision[1])
        if not plan:
            log.info("%s: low-rank splits no layer", graph.name)
            return graph
        before = layer_flops(graph)
        rewritten = self._rewrite(graph, plan)
        for split in self.splits:
            if not split.skipped:
                log.info("low-rank %s: rank %d of %d, %.3g -> %.3g MFLOPs", split.layer, split.rank,
                         split.full_rank, split.flops_before / 1e6, split.flops_after / 1e6)
        return rewritten.replace(layer_flops_before={**before, **graph.layer_flops_before})

    def _plan_layer(self, graph: Graph, layer, n_uses: int):
        from lastbit.passes.flops import layer_key

        name = layer_key(graph, layer.weight)
        w = graph.params[layer.weight]
        out_shape = [int(d) for d in layer.relax_var.ty.shape]

        def skip(why: str, flops: int = 0, full: int = 0):
            return LowRankSplit(name, layer.kind, full, full, flops, flops, skipped=why), None

        if self.ranks is not None and name not in self.ranks:
            return skip("no rank asked for this layer")
        if layer.unsupported:
            return skip(layer.unsupported)
        if n_uses > 1:
            return skip("weight shared by several layers")
        if layer.weight in graph.quant or w.dtype != np.float32:
            return skip("weight is not float32")
        if layer.kind == "dense":
            if w.ndim != 2 or layer.axis is None or len(layer.call.args[1].ty.shape) != 2:
                return skip("dense weight is not a plain 2-D matrix")
            m = w.T if layer.axis == 0 else w  # the operand x is multiplied by: K×N
            k, n = m.shape
            rows = int(np.prod(out_shape[:-1]))
            flops, per_rank = 2 * rows * k * n, 2 * rows * (k + n)
            matrix = m
        elif layer.kind == "conv2d":
            if int(layer.call.attrs.groups) != 1 or str(layer.call.attrs.kernel_layout) != "OIHW" \
                    or str(layer.call.attrs.data_layout) != "NCHW":
                return skip("grouped conv or a layout other than NCHW/OIHW")
            o, i, kh, kw = w.shape
            positions = int(np.prod(out_shape)) // o
            flops = 2 * positions * o * i * kh * kw
            if kh * kw == 1:
                return skip("1x1 conv", flops)
            if self.conv_mode == "separable":
                # the vertical conv has no horizontal extent: its output keeps the input width
                mid_positions = out_shape[0] * out_shape[2] * int(layer.call.args[0].ty.shape[3])
                per_rank = 2 * (mid_positions * i * kh + positions * o * kw)
                matrix = w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
            else:
                per_rank = 2 * (positions * i * kh * kw + positions * o)
                matrix = w.reshape(o, -1)
        else:
            return skip(f"{layer.kind} layers are not split")
        full = min(matrix.shape)
        if w.size < self.min_params and self.ranks is None:
            return skip(f"small layer ({w.size} params < {self.min_params})", flops, full)
        s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
        rank = self._choose_rank(s, flops, per_rank, name)
        after = rank * per_rank
        if self.rank is None and self.ranks is None and after > self.max_flop_share * flops:
            return skip(f"rank {rank} of {full} would keep {after / flops:.0%} of the FLOPs", flops, full)
        if layer.kind == "dense":
            a, b = split_dense(matrix, rank)
        elif self.conv_mode == "separable":
            a, b = split_conv_separable(w, rank)
        else:
            a, b = split_conv(w, rank)
        return LowRankSplit(name, layer.kind, full, rank, flops, after), (a, b)

    def _rewrite(self, graph: Graph, plan: dict) -> Graph:
        from tvm import relax

        from lastbit.passes.relax_rebuild import SKIP, rebuild_main

        dropped = {layer.weight for layer, *_ in plan.values()}
        params: dict[str, np.ndarray] = {}
        source_names = dict(graph.source_names)
        new_names: dict[str, tuple[str, str]] = {}
        for name, value in graph.params.items():
            if name not in dropped:
                params[name] = value
                continue
            _, a, b = next(entry for entry in plan.values() if entry[0].weight == name)
            base = graph.source_names.get(name, name).removesuffix(".weight")
            names = (f"{name}.svd0", f"{name}.svd1")
            params[names[0]], params[names[1]] = a, b
            source_names.pop(name, None)
            source_names[names[0]], source_names[names[1]] = f"{base}.svd0.weight", f"{base}.svd1.weight"
            new_names[name] = names
        param_var = {name: var for var, name in graph.param_vars().items()}
        gone = {param_var[name] for name in dropped}
        conv_mode = self.conv_mode

        def hook(rb, var, value):
            if var.name in plan and isinstance(value, relax.Call):
                layer = plan[var.name][0]
                first, second = (rb.params[n] for n in new_names[layer.weight])
                x = rb.remap(value.args[0])
                if layer.kind == "dense":
                    hidden = rb.bb.emit(relax.op.matmul(x, first), name_hint=var.name + "_svd0")
                    return relax.op.matmul(hidden, second)
                return _split_conv_calls(rb, var, value.attrs, x, first, second, conv_mode)
            if isinstance(value, relax.Call) and any(
                    isinstance(a, relax.Var) and a in gone for a in value.args):
                gone.add(var)  # a view (permute/reshape) of a split weight: its only user is rewritten
                return SKIP
            return None

        return rebuild_main(graph, params, hook, source_names=source_names)


def _split_conv_calls(rb, var, attrs, x, first, second, conv_mode: str):
    """The two convs replacing one: k×k with r filters then 1×1, or k×1 then 1×k."""
    from tvm import relax

    strides = [int(v) for v in attrs.strides]
    padding = [int(v) for v in attrs.padding]  # top, left, bottom, right
    dilation = [int(v) for v in attrs.dilation]
    # out_dtype spelled out as the importers do: the integer lowering declines a conv whose
    # out_dtype is unset ("None"), so split layers would otherwise lose their integer kernels
    common = {"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW", "out_dtype": "float32"}
    if conv_mode == "separable":
        vertical = relax.op.nn.conv2d(x, first, strides=[strides[0], 1], padding=[padding[0], 0, padding[2], 0],
                                      dilation=[dilation[0], 1], **common)
        hidden = rb.bb.emit(vertical, name_hint=var.name + "_svd0")
        return relax.op.nn.conv2d(hidden, second, strides=[1, strides[1]], padding=[0, padding[1], 0, padding[3]],
                                  dilation=[1, dilation[1]], **common)
    spatial = relax.op.nn.conv2d(x, first, strides=strides, padding=padding, dilation=dilation, **common)
    hidden = rb.bb.emit(spatial, name_hint=var.name + "_svd0")
    return relax.op.nn.conv2d(hidden, second, strides=[1, 1], padding=[0, 0, 0, 0], **common)


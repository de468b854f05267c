"""Structured channel pruning as a graph rewrite: channels are removed from the weights, the
batch-norm statistics, the biases and the reshape targets, so the compiled model really has
fewer FLOPs and bytes (not a mask).

Which channels go together comes from :mod:`lastbit.passes.channel_groups`; how important a
channel is comes from one of three criteria, plain numpy/torch functions here:

* ``l1``     — L1 norm of each producer's filter (normalized per layer, summed over a group);
* ``bn``     — |γ| of the batch-norms on the channel (network slimming); L1 where there is none;
* ``taylor`` — first-order Taylor estimate of the loss change when the channel is removed,
  (Σ w·∂L/∂w over every weight the channel owns)² averaged over batches (Molchanov et al.
  2019). It weighs magnitude and gradient together: a small weight with a large gradient
  stays. Needs the torch module and labelled data.

How many: one ratio for every group, a ratio per layer (keyed by the weight's source name,
``"layer1.0.conv1"``), or a FLOP target (``"flops:0.5"`` keeps about half of the FLOPs,
removing the globally least important channels first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastbit.errors import LastbitError
from lastbit.graph import Graph
from lastbit.passes.channel_groups import (
    ChannelAnalysis,
    ChannelGroup,
    analyze_channels,
    elementwise_call_tir_op,
)

log = logging.getLogger(__name__)

__all__ = [
    "CRITERIA",
    "PruneChannels",
    "PruneError",
    "PruneTarget",
    "channel_scores",
    "group_ratio_conflict",
    "l1_filter_scores",
    "parse_prune_target",
    "producer_ratios",
    "prune_channels",
    "taylor_scores",
]

CRITERIA = ("l1", "bn", "taylor")
# Kept channel counts are rounded to multiples of this: the CPU kernels block channels by the
# largest power of two ≤ the SIMD width that divides the count, so 11 channels run with a
# block of 1 and lose more time than pruning saved (8 divides every x86/ARM vector width).
ROUND_TO = 8


class PruneError(LastbitError):
    """A pruning setting is invalid (ratio out of range, unknown criterion, a layer that is not there)."""


@dataclass(frozen=True)
class PruneTarget:
    """How much to prune: ``ratio`` of every group's channels, ``per_layer`` ratios, or keep
    ``flops`` (a fraction) of the prunable layers' FLOPs."""

    ratio: float | None = None
    per_layer: Mapping[str, float] | None = None
    flops: float | None = None

    def describe(self) -> str:
        if self.flops is not None:
            return f"flops:{self.flops:g}"
        if self.per_layer is not None:
            return f"{len(self.per_layer)} per-layer ratios"
        return f"{self.ratio:g}"


def parse_prune_target(spec: Any) -> PruneTarget:
    """A float ratio in [0, 1), a {layer: ratio} mapping, or "flops:F" with F in (0, 1]."""
    def ratio(value, what: str) -> float:
        try:
            r = float(value)
        except (TypeError, ValueError):
            raise PruneError(f"prune ratio for {what} must be a number in [0, 1), got {value!r}") from None
        if isinstance(value, bool) or not 0 <= r < 1 or not math.isfinite(r):
            raise PruneError(f"prune ratio for {what} must be in [0, 1), got {value!r}")
        return r

    if isinstance(spec, PruneTarget):
        return spec
    if isinstance(spec, Mapping):
        return PruneTarget(per_layer={str(k): ratio(v, repr(k)) for k, v in spec.items()})
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text.startswith("flops:"):
            try:
                f = float(text.split(":", 1)[1])
            except ValueError:
                raise PruneError(f"prune target {spec!r}: expected flops:F with F in (0, 1]") from None
            if not 0 < f <= 1:
                raise PruneError(f"prune target {spec!r}: the FLOP fraction to keep must be in (0, 1]")
            return PruneTarget(flops=f)
        return PruneTarget(ratio=ratio(text, "every layer"))
    return PruneTarget(ratio=ratio(spec, "every layer"))


# --- criteria (numpy / torch, no TVM) -----------------------------------------------------------


def l1_filter_scores(weight: np.ndarray, axis: int) -> np.ndarray:
    """L1 norm of each slice of ``weight`` along ``axis`` (one per output channel)."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)


def taylor_scores(contributions: np.ndarray) -> np.ndarray:
    """(Σ w·g)² per channel averaged over batches: ``contributions`` is [batches, channels] of
    Σ w·∂L/∂w over the weights each channel owns, one row per batch."""
    c = np.asarray(contributions, dtype=np.float64)
    return (c ** 2).mean(axis=0)


def _per_label_sum(values: np.ndarray, axis: int, classes: np.ndarray, index: dict[int, int], out: np.ndarray) -> None:
    """Add the sum of each slice of ``values`` along ``axis`` to ``out`` at its class's index."""
    sums = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).sum(axis=1)
    for cls, s in zip(classes.tolist(), sums.tolist()):
        i = index.get(cls)
        if i is not None:
            out[i] += s


def channel_scores(graph: Graph, analysis: ChannelAnalysis, group: ChannelGroup, criterion: str,
                   taylor: dict[int, float] | None = None) -> np.ndarray:
    """Importance of each channel of ``group`` (higher = keep), in ``group.channels`` order."""
    index = {c: i for i, c in enumerate(group.channels)}
    scores = np.zeros(len(group.channels))
    if criterion == "taylor":
        if taylor is None:
            raise PruneError("the taylor criterion needs gradients: a torch module and labelled data")
        return np.array([taylor.get(c, 0.0) for c in group.channels])
    if criterion == "bn":
        gammas = [g for g in analysis.bn_gammas if
                  np.isin(analysis.find(analysis.param_labels[g][0]), group.channels).any()]
        if gammas:
            for g in gammas:
                _per_label_sum(np.abs(graph.params[g]), 0, analysis.find(analysis.param_labels[g][0]), index, scores)
            return scores
        log.info("group %s has no batch-norm; ranking its channels by L1", group.name)
    for producer in group.producers:
        s = l1_filter_scores(graph.params[producer.weight], producer.axis)
        s = s / max(float(s.mean()), 1e-12)  # layers of different scale count alike
        classes = analysis.find(producer.labels)
        for cls, v in zip(classes.tolist(), s.tolist()):
            scores[index[cls]] += v
    return scores


def taylor_contributions(graph: Graph, analysis: ChannelAnalysis, module, data, batch_size: int = 64,
                         max_batches: int = 8) -> dict[int, float]:
    """Taylor score of every channel class, from the torch module ``graph`` was imported from.

    Each batch's gradients of the cross-entropy loss are multiplied by the weights and summed
    over every weight entry a class owns (both the filters it produces and the weights that
    read it), then squared; scores are averaged over up to ``max_batches`` batches.
    """
    import torch

    from lastbit.passes.quantize_pow2 import calibration_inputs

    named = dict(module.named_parameters())
    tied = {name: named[src] for name, src in graph.source_names.items() if src in named and name in graph.params}
    if not tied:
        raise PruneError("the taylor criterion found no graph parameter in the torch module (source_names)")
    x = calibration_inputs(data, batch_size * max_batches)
    y = _labels(data, len(x))
    classes: set[int] = {c for g in analysis.groups for c in g.channels}
    index = {c: i for i, c in enumerate(sorted(classes))}
    rows = []
    was_training = module.training
    module.eval()  # batch-norm as imported: running statistics
    try:
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[start:start + batch_size], dtype=np.float32))
            yb = torch.as_tensor(np.asarray(y[start:start + batch_size])).long()
            module.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(xb), yb)
            loss.backward()
            row = np.zeros(len(index))
            for name, p in tied.items():
                if p.grad is None:
                    continue
                wg = (p.detach() * p.grad).double().numpy()
                if wg.shape != graph.params[name].shape:
                    raise PruneError(f"parameter {name!r} ({graph.source_names[name]}) has shape {wg.shape} "
                                     f"in torch but {graph.params[name].shape} in the graph")
                for axis, labels in enumerate(analysis.param_labels[name]):
                    _per_label_sum(wg, axis, analysis.find(labels), index, row)
            rows.append(row)
    finally:
        module.zero_grad()
        module.train(was_training)
    scores = taylor_scores(np.stack(rows))
    return {c: float(scores[i]) for c, i in index.items()}


def _labels(data, n: int) -> np.ndarray:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        y = data[1]
        return (y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y))[:n]
    ys = []
    for batch in data:
        y = batch[1]
        ys.append(y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y))
        if sum(len(v) for v in ys) >= n:
            break
    return np.concatenate(ys)[:n]


# --- choosing channels ---------------------------------------------------------------------------


def _group_ratio(graph: Graph, group: ChannelGroup, target: PruneTarget) -> float:
    if target.ratio is not None:
        return target.ratio
    conflict = group_ratio_conflict(graph, group, target.per_layer)
    if conflict:
        raise PruneError(conflict)
    return max(producer_ratios(graph, group, target.per_layer).values(), default=0.0)


def producer_ratios(graph: Graph, group: ChannelGroup, per_layer: Mapping[str, float]) -> dict[str, float]:
    """{layer: ratio} of the producers of ``group`` that ``per_layer`` asks to prune (ratio > 0),
    each found by its source name with or without ``.weight``, its weight or its Relax var."""
    ratios = {}
    for p in group.producers:
        src = graph.source_names.get(p.weight, p.weight)
        for key in (src, src.removesuffix(".weight"), p.weight, p.layer):
            if key in per_layer:
                if per_layer[key] > 0:
                    ratios[_layer_name(graph, p)] = per_layer[key]
                break
    return ratios


def _layer_name(graph: Graph, producer) -> str:
    return graph.source_names.get(producer.weight, producer.weight).removesuffix(".weight")


def group_ratio_conflict(graph: Graph, group: ChannelGroup, per_layer: Mapping[str, float]) -> str:
    """Why ``per_layer`` cannot prune ``group`` ('' when it can): a group several layers produce
    (a residual chain) is pruned once, so every producer that prunes it must ask for the same
    ratio (a producer left out, or at ratio 0, follows the others)."""
    ratios = producer_ratios(graph, group, per_layer)
    if len(set(ratios.values())) < 2:
        return ""
    asked = ", ".join(f"{layer} keep {1 - r:g}" for layer, r in ratios.items())
    group_name = "+".join(_layer_name(graph, p) for p in group.producers)
    return (f"channel group {group_name} is pruned as one (its layers share channels through residual "
            f"adds or concats) but its layers ask for different keep ratios: {asked}; give them the same keep")


def _channel_flops(graph: Graph, analysis: ChannelAnalysis) -> dict[int, float]:
    """Approximate FLOPs saved by removing one channel class, alone: each conv/dense layer
    loses the weight slices the class owns, times its output positions."""
    from lastbit.passes.quantize_pow2 import weighted_layers

    saved: dict[int, float] = {}
    for layer in weighted_layers(graph):
        w = graph.params.get(layer.weight)
        if w is None or layer.weight not in analysis.param_labels:
            continue
        out_shape = [int(d) for d in layer.relax_var.ty.shape]
        positions = int(np.prod(out_shape)) // max(int(out_shape[1] if layer.kind != "dense" else out_shape[-1]), 1)
        for axis, labels in enumerate(analysis.param_labels[layer.weight]):
            if w.shape[axis] <= 1:
                continue
            per_slice = 2.0 * w.size / w.shape[axis] * positions
            for cls in analysis.find(labels).tolist():
                saved[cls] = saved.get(cls, 0.0) + per_slice
    return saved


def aligned_removal(channels: int, remove: float, max_remove: int, round_to: int, down: bool = False) -> int:
    """How many of a group's ``channels`` to remove when about ``remove`` should go: the kept
    count is rounded to the nearest multiple of a block (halves up; ``down``: always down, to
    meet a FLOP target), at least one block, where the block is the largest power of two
    ≤ ``round_to`` that divides ``channels`` at least twice, so the kernels keep whole SIMD
    channel blocks; with no such block > 1 the group is pruned exactly."""
    n = math.floor(remove + 1e-9)
    step = max(1, round_to)
    while step > 1 and (channels % step or channels < 2 * step):
        step //= 2
    if step > 1 and n > 0:
        blocks = (channels - remove) / step
        kept = max(step, step * math.floor(blocks + (1e-9 if down else 0.5)))
        n = channels - kept
    return max(0, min(n, max_remove))


def choose_channels(graph: Graph, analysis: ChannelAnalysis, target: PruneTarget, criterion: str,
                    taylor: dict[int, float] | None = None, round_to: int = 1) -> set[int]:
    """The channel classes to remove. Pinned channels stay, every group keeps at least one,
    and kept counts are rounded to multiples of ``round_to`` (see :func:`aligned_removal`)."""
    removed: set[int] = set()
    scored = []
    for group in analysis.groups:
        if group.reason:
            continue
        scores = channel_scores(graph, analysis, group, criterion, taylor)
        candidates = sorted((s, c) for s, c in zip(scores.tolist(), group.channels) if c not in group.pinned)
        max_remove = min(len(candidates), len(group.channels) - 1)
        scored.append((group, scores, candidates, max_remove))
    if target.flops is None:
        for group, _, candidates, max_remove in scored:
            want = _group_ratio(graph, group, target) * len(group.channels)
            n = aligned_removal(len(group.channels), want, max_remove, round_to)
            removed.update(c for _, c in candidates[:n])
        return removed
    # FLOP target: one global ranking, each score relative to its group's mean.
    saving = _channel_flops(graph, analysis)
    total = _total_flops(graph)
    goal = total * (1.0 - target.flops)
    ranking = []
    for group, scores, candidates, max_remove in scored:
        mean = max(float(np.mean(scores)), 1e-12)
        ranking += [(s / mean, c, id(group), max_remove) for s, c in candidates]
    taken: dict[int, int] = {}
    saved = 0.0
    for _, cls, gid, max_remove in sorted(ranking, key=lambda r: r[0]):
        if saved >= goal:
            break
        if taken.get(gid, 0) >= max_remove:
            continue
        taken[gid] = taken.get(gid, 0) + 1
        saved += saving.get(cls, 0.0)
    for group, _, candidates, max_remove in scored:  # each group's share, aligned, its weakest first
        n = aligned_removal(len(group.channels), taken.get(id(group), 0), max_remove, round_to, down=True)
        removed.update(c for _, c in candidates[:n])
    return removed


def _total_flops(graph: Graph) -> float:
    from lastbit.passes.flops import layer_flops

    return float(sum(layer_flops(graph).values()))


# --- the rewrite -----------------------------------------------------------------------------------


def prune_channels(graph: Graph, analysis: ChannelAnalysis, removed: set[int]) -> Graph:
    """``graph`` with the channel classes in ``removed`` deleted from every parameter, constant
    and reshape target."""
    from tvm import relax

    params = {}
    for name, value in graph.params.items():
        for axis, labels in enumerate(analysis.param_labels[name]):
            keep = analysis.keep_indices(labels, removed)
            if len(keep) < value.shape[axis]:
                value = np.take(value, keep, axis=axis)
        params[name] = np.ascontiguousarray(value)
    consts = []
    for const, axes in analysis.const_labels:
        value = const.value.numpy()
        changed = False
        for axis, labels in enumerate(axes):
            keep = analysis.keep_indices(labels, removed)
            if len(keep) < value.shape[axis]:
                value, changed = np.take(value, keep, axis=axis), True
        if changed:
            consts.append((const, relax.const(np.ascontiguousarray(value), str(value.dtype))))

    def new_shape(var) -> list[int]:
        return [len(analysis.keep_indices(labels, removed)) for labels in analysis.var_labels[var]]

    def hook(rb, var, value):
        op = getattr(value.op, "name", "") if isinstance(value, relax.Call) else ""
        if op == "relax.reshape":
            return relax.op.reshape(rb.remap(value.args[0]), new_shape(var))
        if op in ("relax.nn.conv2d", "relax.nn.conv1d") and int(value.attrs.groups) > 1 and \
                int(value.attrs.groups) == int(value.args[0].ty.shape[1]) and int(value.args[1].ty.shape[1]) == 1:
            return _depthwise_with_groups(value, rb.remap(value.args[0]), rb.remap(value.args[1]),
                                          new_shape(var)[1])
        if op == "relax.call_tir":  # a fixed-shape TensorIR map (ONNX Clip): back to its Relax op
            binary = elementwise_call_tir_op(graph.mod, value)
            if binary is not None:
                return getattr(relax.op, binary)(*[rb.remap(a) for a in value.args[1].fields])
        return None

    from lastbit.passes.relax_rebuild import rebuild_main

    return rebuild_main(graph, params, hook, consts=consts, source_names=dict(graph.source_names))


def _depthwise_with_groups(call, data, weight, channels: int):
    """A depthwise conv with its group count set to its new channel count (the analysis pins
    every other grouped conv, so only depthwise ones reach here with channels removed)."""
    from tvm import relax

    a = call.attrs
    conv = relax.op.nn.conv2d if call.op.name == "relax.nn.conv2d" else relax.op.nn.conv1d
    kwargs = {}
    if str(a.out_dtype) not in ("", "void", "None"):
        kwargs["out_dtype"] = str(a.out_dtype)
    return conv(data, weight, strides=[int(v) for v in a.strides], padding=[int(v) for v in a.padding],
                dilation=[int(v) for v in a.dilation], groups=channels, data_layout=str(a.data_layout),
                kernel_layout=str(a.kernel_layout), out_layout=str(a.out_layout), **kwargs)


class PruneChannels:
    """Graph -> Graph: remove the least important channels of every prunable channel group.

    Groups the analysis cannot prune safely (a pinned channel flows through an op it does not
    model, the model output, a grouped conv) are skipped and the reason is logged. Kept
    channel counts are rounded to multiples of ``round_to`` (1: exact ratios); the FLOPs of
    every layer before the rewrite are kept in ``Graph.layer_flops_before`` for the report.
    With ``finetune_epochs`` the source torch module is shrunk alike, fine-tuned and
    re-imported (``passes/prune_finetune.py``); the module is left untouched.
    """

    def __init__(self, target: Any, criterion: str = "l1", torch_module=None, data=None, batch_size: int = 64,
                 round_to: int = ROUND_TO, finetune_epochs: int = 0, lr: float = 0.01):
        if criterion not in CRITERIA:
            raise PruneError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise PruneError(f"finetune_epochs must be an int ≥ 0, got {finetune_epochs!r}")
        self.finetune_epochs = finetune_epochs
        self.lr = lr
        self.finetuned = None  # the shrunk, fine-tuned torch module (finetune_epochs > 0)
        self.target = parse_prune_target(target)
        self.criterion = criterion
        self.torch_module = torch_module
        self.data = data
        self.batch_size = batch_size
        self.round_to = round_to
        self.removed_channels = 0
        self.skipped: list[tuple[str, str]] = []  # (group, reason)

    def __call__(self, graph: Graph) -> Graph:
        from lastbit.passes.flops import layer_flops

        analysis = analyze_channels(graph)
        self.skipped = [(g.name, g.reason) for g in analysis.groups if g.reason]
        per_layer = self.target.per_layer
        if per_layer is not None:
            known = {k for p in (pr for g in analysis.groups for pr in g.producers)
                     for k in (graph.source_names.get(p.weight, p.weight),
                               graph.source_names.get(p.weight, p.weight).removesuffix(".weight"), p.weight, p.layer)}
            unknown = sorted(set(per_layer) - known)
            if unknown:
                raise PruneError(f"prune ratios name layers that are not in {graph.name}: {', '.join(unknown)}")
        criterion = self.criterion
        taylor = None
        if criterion == "taylor":
            if self.torch_module is None or self.data is None:
                raise PruneError("prune_criterion='taylor' needs the torch module and labelled data (Squeeze.data)")
            taylor = taylor_contributions(graph, analysis, self.torch_module, self.data, self.batch_size)
        removed = choose_channels(graph, analysis, self.target, criterion, taylor, self.round_to)
        self.removed_channels = len(removed)
        if not removed:
            log.warning("%s: pruning (%s) removes no channel", graph.name, self.target.describe())
            return graph
        before = layer_flops(graph)
        pruned = prune_channels(graph, analysis, removed)
        log.info("%s: pruned %d channels (%s, %s): %.3g -> %.3g MFLOPs", graph.name, len(removed),
                 self.target.describe(), criterion, sum(before.values()) / 1e6,
                 sum(layer_flops(pruned).values()) / 1e6)
        pruned = pruned.replace(layer_flops_before={**before, **graph.layer_flops_before})
        if self.finetune_epochs:
            from lastbit.passes.prune_finetune import finetune_pruned
            from lastbit.squeeze import data_has_labels

            if self.torch_module is None or not data_has_labels(self.data):
                raise PruneError("fine-tuning after pruning needs the torch module and labelled data")
            pruned, self.finetuned = finetune_pruned(self.torch_module, graph, pruned, analysis, removed, self.data,
                                                     self.finetune_epochs, self.lr, self.batch_size)
        return pruned

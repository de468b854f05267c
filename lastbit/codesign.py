"""Co-design search: each layer's code set, keep ratio and rank chosen from the target's own
measured cost and a per-layer accuracy sensitivity, exactly, under an accuracy-drop budget.

    sites     = model_sites(graph, lanes)                    # layers and what can change
    residuals = residual_groups(graph, sites, lanes)         # channel groups several layers produce
    combos    = residual_combos(sites, residuals)            # one per choice of their keeps
    costs     = measure_costs(combos[0].groups, source, cache, extra=...)  # measured + predicted
    drops     = layer_sensitivity(module, graph, sites, x, y, residuals=residuals)
    tables    = combo_tables(combos, residuals, costs, drops, slope, metric)
    chosen    = search(tables, max_drop)                     # knapsack (DP) per combination

Layers whose costs depend on each other — a pruned conv and the layers that read its
channels — form one group whose options are the product of theirs, so the knapsack stays
exact. A residual channel group (the stem and every block's last conv of a ResNet stage,
joined by the adds) touches the inputs and outputs of many layers that belong to other
groups; rather than one group of all of them (whose options would multiply), every
combination of the residual groups' keeps fixes those layers' channels and gets its own
exact knapsack, and the search takes the cheapest combination within the budget.
``run_codesign`` is the whole flow the ``lastbit codesign`` command runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lastbit.codesign_cost import CostCache, CostModel, CostPoint, CostSource
from lastbit.errors import LastbitError
from lastbit.graph import Graph
from lastbit.layer_config import FLOAT_CODES, LayerChoice, LayerConfig

log = logging.getLogger(__name__)

__all__ = ["CODES", "COST_TIE", "KEEPS", "RESIDUAL_KEEPS", "CodesignResult", "LayerSite", "OBJECTIVES",
           "ResidualGroup", "Verification", "Verified", "combo_tables", "finetune_config", "layer_sensitivity",
           "measure_costs", "model_sites", "residual_combos", "residual_groups", "restructure_module", "retarget",
           "run_codesign", "search", "verify_search"]

CODES = ("binary", "ternary", "pow2-2", "pow2-4", "int8", FLOAT_CODES)
KEEPS = (1.0, 0.75, 0.5, 0.25)
# a residual group feeds every block of its stage: a quarter of it costs too much accuracy to
# be worth the combinations (each keep multiplies them)
RESIDUAL_KEEPS = (1.0, 0.75, 0.5)
# costs within this share of the cheapest are equally cheap (timing noise on the host is ~1 %)
COST_TIE = 0.02
# Share of the fine-tuning images spent training the restructured float model before the codes
# are picked (finetune_config). ADMM at its BatchNorm default freezes the codes of its first
# projection, so a freshly pruned or split network kept the codes of its damaged weights: on
# ResNet-8 with half the inner channels pruned, 1 epoch of ADMM on 20k images ended at 78.2 %
# against 81.6 % with 10k images of float recovery then 10k of ADMM (uniform 3-bit: 83.2 and
# 83.9 %; the codesign bench's prune_recovery before, at f6e4372, and after). Every configuration
# gets the same split, so the comparison stays at equal budget; a half is the one share measured.
RECOVER_FRACTION = 0.5
OBJECTIVES = {"latency": "latency_ms", "cycles": "cycles", "energy": "energy_pj", "bytes": "weight_bytes"}


@dataclass
class LayerSite:
    """A weighted layer of the model and the choices it offers."""

    name: str
    op: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_hw: tuple[int, int]
    batch: int
    keeps: tuple[float, ...] = (1.0,)  # distinct kept shares of its output group (1.0 first)
    kept_channels: tuple[int, ...] = ()  # channels each keep leaves
    ranks: tuple[int | None, ...] = (None,)
    input_from: str | None = None  # the prunable layer whose keep sets our input channels
    codes: tuple[str, ...] = CODES

    def choices(self) -> list[LayerChoice]:
        return [LayerChoice(c, k, r) for k in self.keeps for r in self.ranks for c in self.codes]

    def point(self, choice: LayerChoice, in_channels: int | None = None) -> CostPoint:
        out = self.kept_channels[self.keeps.index(choice.keep)] if self.kept_channels else self.out_channels
        cin = in_channels if in_channels is not None else self.in_channels
        rank = None
        if choice.rank is not None:
            rank = min(choice.rank, out, cin * self.kernel[0] * self.kernel[1])
        return CostPoint(self.op, cin, out, self.kernel, self.stride, self.padding, self.in_hw, self.batch,
                         choice.codes, rank, bn_relu=self.op == "conv2d")


def model_sites(graph: Graph, lanes: int = 8, codes: Sequence[str] = CODES, keeps: Sequence[float] = KEEPS,
                ranks: bool = True) -> list[LayerSite]:
    """The weighted layers of ``graph`` with their options: every code set; the keep ratios
    that give distinct channel counts (after the pruning pass rounds to ``lanes``) for a layer
    that alone produces a prunable channel group (groups several layers produce are
    :func:`residual_groups`); half the full rank for k×k convs."""
    from lastbit.passes.channel_groups import analyze_channels
    from lastbit.passes.flops import layer_key
    from lastbit.passes.quantize_pow2 import weighted_layers

    analysis = analyze_channels(graph)
    sole_producer = {g.producers[0].weight: g for g in _prunable_groups(analysis) if len(g.producers) == 1}
    sites: list[LayerSite] = []
    site_layers = []
    for layer in weighted_layers(graph):
        w = graph.params[layer.weight]
        name = layer_key(graph, layer.weight)
        data_shape = [int(d) for d in layer.call.args[0].ty.shape]
        if layer.kind == "conv2d":
            a = layer.call.attrs
            if int(a.groups) != 1:
                raise LastbitError(f"codesign: layer {name} is a grouped conv (groups={int(a.groups)}), not supported yet")
            site = LayerSite(name, "conv2d", int(w.shape[1]), int(w.shape[0]), (int(w.shape[2]), int(w.shape[3])),
                             tuple(int(s) for s in a.strides), (int(a.padding[0]), int(a.padding[1])),
                             (data_shape[2], data_shape[3]), data_shape[0], codes=tuple(codes))
        elif layer.kind == "dense" and w.ndim == 2 and layer.axis is not None:
            out = int(w.shape[layer.axis])
            site = LayerSite(name, "dense", int(w.size // out), out, (1, 1), (1, 1), (0, 0), (1, 1),
                             int(np.prod(data_shape[:-1])), codes=tuple(codes))
        else:
            log.info("codesign: %s (%s) keeps its global setting", name, layer.kind)
            continue
        group = sole_producer.get(layer.weight)
        if group is not None:
            site.keeps, site.kept_channels = keep_options(len(group.channels), keeps, lanes)
        full = min(site.out_channels, site.in_channels * site.kernel[0] * site.kernel[1])
        half = (full // 2) // 8 * 8
        if ranks and site.op == "conv2d" and site.kernel != (1, 1) and half >= 8:
            site.ranks = (None, half)
        sites.append(site)
        site_layers.append(layer)
    producers = {layer_key(graph, w): g for w, g in sole_producer.items()}
    for site, layer in zip(sites, site_layers):
        inputs = set(_input_classes(analysis, layer, site).tolist())
        for producer, group in producers.items():
            if producer != site.name and inputs & set(group.channels):
                site.input_from = producer
    return sites


def _prunable_groups(analysis) -> list:
    """The channel groups the search may prune: prunable and with no pinned channel."""
    return [g for g in analysis.groups if not g.reason and not g.pinned]


def _input_classes(analysis, layer, site: LayerSite) -> np.ndarray:
    """The channel class of each input channel of ``layer`` (empty for a layer with none)."""
    labels = analysis.param_labels.get(layer.weight)
    if labels is None or len(labels) < 2:
        return np.zeros(0, dtype=np.int64)
    in_axis = 1 if site.op == "conv2d" or layer.axis == 0 else 0  # torch Linear [out, in]; ONNX [in, out]
    return analysis.find(labels[in_axis])


def kept_channel_count(channels: int, keep: float, lanes: int) -> int:
    """How many of a group's ``channels`` the pruning pass keeps for ``keep`` (lanes-aligned)."""
    from lastbit.passes.prune_channels import aligned_removal

    return channels - aligned_removal(channels, (1 - keep) * channels, channels - 1, lanes)


def keep_options(channels: int, keeps: Sequence[float], lanes: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The ``keeps`` that leave distinct channel counts, as the shares the pass really keeps,
    and those counts."""
    seen: dict[int, float] = {}
    for k in keeps:
        kept = kept_channel_count(channels, k, lanes)
        seen.setdefault(kept, kept / channels)
    return tuple(seen.values()), tuple(seen)


@dataclass
class ResidualGroup:
    """A prunable channel group several layers produce (a ResNet stage's residual chain: its
    stem or downsample conv and every block's last conv, joined by the adds), pruned as one."""

    name: str  # its producers' names joined by "+"
    channels: int
    producers: tuple[str, ...]
    consumers: dict[str, float]  # layer -> its input channels per channel of the group
    keeps: tuple[float, ...] = (1.0,)
    kept_channels: tuple[int, ...] = ()

    def kept(self, keep: float) -> int:
        return self.kept_channels[self.keeps.index(keep)]

    def config(self, keep: float) -> LayerConfig:
        """Every producer, float, at ``keep``: how a LayerConfig says the group is pruned."""
        return LayerConfig({p: LayerChoice(FLOAT_CODES, keep=keep) for p in self.producers})


def residual_groups(graph: Graph, sites: list[LayerSite], lanes: int = 8,
                    keeps: Sequence[float] = RESIDUAL_KEEPS) -> list[ResidualGroup]:
    """The prunable channel groups of ``graph`` that several of the ``sites`` produce, with the
    keeps that give distinct channel counts and the sites that read them."""
    from lastbit.passes.channel_groups import analyze_channels
    from lastbit.passes.flops import layer_key
    from lastbit.passes.quantize_pow2 import weighted_layers

    analysis = analyze_channels(graph)
    by_name = {s.name: s for s in sites}
    layers = [(by_name[layer_key(graph, layer.weight)], layer) for layer in weighted_layers(graph)
              if layer_key(graph, layer.weight) in by_name]
    residuals = []
    for group in _prunable_groups(analysis):
        producers = tuple(layer_key(graph, p.weight) for p in group.producers)
        if len(producers) < 2 or not all(p in by_name for p in producers):
            continue
        consumers = {}
        for site, layer in layers:
            reads = int(np.isin(_input_classes(analysis, layer, site), group.channels).sum())
            if reads:
                consumers[site.name] = reads / len(group.channels)
        options, kept = keep_options(len(group.channels), keeps, lanes)
        residuals.append(ResidualGroup("+".join(producers), len(group.channels), producers, consumers, options, kept))
    return residuals


# --- groups of dependent layers --------------------------------------------------------------


@dataclass
class SiteGroup:
    """Layers chosen together: a prunable layer and the layers that read its channels."""

    sites: list[LayerSite]
    options: list[tuple[LayerChoice, ...]] = field(default_factory=list)

    def points(self, option: tuple[LayerChoice, ...]) -> list[CostPoint]:
        choice_of = {s.name: c for s, c in zip(self.sites, option)}
        points = []
        for site, choice in zip(self.sites, option):
            cin = None
            if site.input_from in choice_of:
                producer = next(s for s in self.sites if s.name == site.input_from)
                keep = choice_of[site.input_from].keep
                cin = producer.kept_channels[producer.keeps.index(keep)] * (site.in_channels // producer.out_channels)
            points.append(site.point(choice, cin))
        return points


def site_groups(sites: list[LayerSite]) -> list[SiteGroup]:
    """Join each layer that reads a prunable layer's channels to that layer's group."""
    index = {s.name: i for i, s in enumerate(sites)}
    parent = list(range(len(sites)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for s in sites:
        producer = sites[index[s.input_from]] if s.input_from in index else None
        if producer is not None and len(producer.keeps) > 1:
            parent[root(index[s.name])] = root(index[s.input_from])
    members: dict[int, list[LayerSite]] = {}
    for i, s in enumerate(sites):
        members.setdefault(root(i), []).append(s)
    groups = []
    for group_sites in members.values():
        options = list(itertools.product(*[s.choices() for s in group_sites]))
        groups.append(SiteGroup(group_sites, options))
    return groups


@dataclass
class ResidualCombo:
    """One keep for every residual group, and the site groups at the channels it leaves."""

    keeps: tuple[float, ...]  # one per residual group, in residual_groups' order
    groups: list[SiteGroup]


def residual_combos(sites: list[LayerSite], residuals: Sequence[ResidualGroup]) -> list[ResidualCombo]:
    """Every combination of the residual groups' keeps (all 1.0 first: the unpruned model),
    each with the site groups of ``sites`` at the input/output channels it leaves them."""
    return [ResidualCombo(keeps, site_groups(_sites_under(sites, residuals, keeps)))
            for keeps in itertools.product(*[r.keeps for r in residuals])]


def _sites_under(sites: list[LayerSite], residuals: Sequence[ResidualGroup],
                 keeps: tuple[float, ...]) -> list[LayerSite]:
    """``sites`` with the channels the residual groups leave at ``keeps``: a producer's outputs,
    a reader's inputs (a flattening dense reads several inputs per channel)."""
    out = []
    for site in sites:
        cin, cout = site.in_channels, site.out_channels
        for residual, keep in zip(residuals, keeps):
            removed = residual.channels - residual.kept(keep)
            if site.name in residual.producers:
                cout -= removed
            cin -= round(removed * residual.consumers.get(site.name, 0.0))
        same = (cin, cout) == (site.in_channels, site.out_channels)
        out.append(site if same else dataclasses.replace(site, in_channels=cin, out_channels=cout))
    return out


# --- cost ------------------------------------------------------------------------------------


@dataclass
class CostTable:
    """Every point the search needs, its metrics, and whether each was measured or predicted."""

    values: dict[CostPoint, dict[str, float]]
    measured: set[CostPoint]
    model_scores: dict[str, float] = field(default_factory=dict)
    measure_s: float = 0.0


def measure_costs(groups: list[SiteGroup], source: CostSource, cache: CostCache, measure_share: float = 0.3,
                  max_measure: int | None = None, seed: int = 0, progress: bool = True,
                  extra: Sequence[list[SiteGroup]] = (), max_extra: int | None = None) -> CostTable:
    """Measure a share of the points (always int8 and fp32 at full size for every layer),
    reuse cached ones, fit the XGBoost cost model on all measurements and predict the rest.

    ``extra``: the site groups of the other residual-keep combinations. Their new points (the
    layers whose channels a residual keep changed) get the same share, their int8/fp32 points
    without rank first, but at most ``max_extra`` of them (default: half as many as the
    first points measure), so residual groups do not multiply the measuring time."""
    from tqdm.auto import tqdm

    points, anchors = _points_and_anchors(groups)
    seen = set(points)
    extra_points, extra_first = [], set()
    for more in extra:
        new, new_anchors = _points_and_anchors(more)
        extra_points += [p for p in new if p not in seen]
        extra_first |= new_anchors
        seen.update(new)
    rng = np.random.default_rng(seed)
    cached = [p for p in points if cache.get(source, p)[0]]
    want = set(anchors) | set(cached)
    rest = [p for p in points if p not in want]
    n_more = max(0, int(round(measure_share * len(points))) - len(want))
    if max_measure is not None:
        n_more = min(n_more, max(0, max_measure - len(want)))
    for i in rng.permutation(len(rest))[:n_more]:
        want.add(rest[i])
    cached_extra = {p for p in extra_points if cache.get(source, p)[0]}
    cap = len(want) // 2 if max_extra is None else max_extra
    n_extra = min(int(round(measure_share * len(extra_points))), cap) - len(cached_extra)
    want |= cached_extra
    if max_measure is not None:
        n_extra = min(n_extra, max(0, max_measure - len(want)))
    order = rng.permutation(len(extra_points))  # shuffled, the int8/fp32 full-rank points first
    ranked = sorted((extra_points[i] for i in order), key=lambda p: p not in extra_first)
    want.update([p for p in ranked if p not in want][:max(0, n_extra)])
    points += extra_points
    todo = [p for p in points if p in want and not cache.get(source, p)[0]]
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=f"measuring on {source.name}", disable=not progress or not todo) as bar:
        for i, point in enumerate(todo):
            cache.put(source, point, source.measure(point))
            bar.update(1)
            if i % 10 == 9:
                cache.save()
    if todo:
        cache.save()
    measure_s = time.perf_counter() - start
    values: dict[CostPoint, dict[str, float]] = {}
    measured, unsupported = set(), set()
    for p in want:
        value = cache.get(source, p)[1]
        if value is None:
            unsupported.add(p)  # the target cannot run this choice: never predicted either
        else:
            values[p] = dict(value)
            measured.add(p)
    table = CostTable(values, measured, measure_s=measure_s)
    unmeasured = [p for p in points if p not in want]
    metrics = [m for m in source.metrics if measured and all(m in values[p] for p in measured)]
    train = sorted(measured, key=lambda p: p.key())
    prior = getattr(source, "lowering_target", None)
    for metric in metrics:
        y = np.array([values[p][metric] for p in train])
        if len(train) >= 8:
            table.model_scores[metric] = CostModel.held_out_scores(train, y, seed=seed, target=prior)
        if unmeasured:
            pred = CostModel(seed, prior).fit(train, y).predict(unmeasured)
            for p, v in zip(unmeasured, pred):
                values.setdefault(p, {})[metric] = float(v)
    for p in points:  # analytic, never measured
        if p in values:
            values[p]["weight_bytes"] = float(p.weight_bytes)
    return table


def _points_and_anchors(groups: list[SiteGroup]) -> tuple[list[CostPoint], set[CostPoint]]:
    """Every distinct point of ``groups``' options, in order, and the anchors among them: each
    layer's int8 and fp32 points at its full size, no rank."""
    points: list[CostPoint] = []
    anchors: set[CostPoint] = set()
    seen: set[CostPoint] = set()
    for group in groups:
        for option in group.options:
            for site, choice, point in zip(group.sites, option, group.points(option)):
                if point not in seen:
                    seen.add(point)
                    points.append(point)
                full = choice.keep == 1.0 and choice.rank is None and point.in_channels == site.in_channels
                if full and choice.codes in ("int8", FLOAT_CODES):
                    anchors.add(point)
    return points, anchors


# --- accuracy --------------------------------------------------------------------------------


def restructure_module(module, graph: Graph, config: LayerConfig, lanes: int = 8):
    """A copy of the torch ``module`` with the config's pruning and low-rank splits applied for
    real (the channels the pruning pass would remove cut out, split layers replaced by two),
    so it can be fine-tuned and compiled with only the code sets left to apply."""
    import copy
    from collections import OrderedDict

    import torch
    from torch import nn

    from lastbit.passes.channel_groups import analyze_channels
    from lastbit.passes.lowrank import split_conv
    from lastbit.passes.prune_channels import PruneTarget, choose_channels
    from lastbit.passes.prune_finetune import shrink_module

    if config.prune_ratios:  # shrink_module works on a copy
        analysis = analyze_channels(graph)
        removed = choose_channels(graph, analysis, PruneTarget(per_layer=config.prune_ratios), "l1", round_to=lanes)
        shrunk = shrink_module(module, graph, analysis, removed)
    else:
        shrunk = copy.deepcopy(module)
    modules = dict(shrunk.named_modules())
    for name, rank in config.ranks.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise LastbitError(f"restructure: rank for {name!r} needs a plain nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight.detach().numpy()
        r = min(rank, w.shape[0], int(np.prod(w.shape[1:])))
        first, second = split_conv(w, r)
        svd0 = nn.Conv2d(conv.in_channels, r, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
        svd1 = nn.Conv2d(r, conv.out_channels, 1, bias=conv.bias is not None)
        with torch.no_grad():
            svd0.weight.copy_(torch.from_numpy(first))
            svd1.weight.copy_(torch.from_numpy(second))
            if conv.bias is not None:
                svd1.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else shrunk
        setattr(parent, child, nn.Sequential(OrderedDict(svd0=svd0, svd1=svd1)))
    return shrunk.eval()


def codes_only(config: LayerConfig) -> LayerConfig:
    return LayerConfig({n: LayerChoice(c.codes) for n, c in config.layers.items()})


def layer_sensitivity(module, graph: Graph, sites: list[LayerSite], x: np.ndarray, y: np.ndarray, lanes: int = 8,
                      progress: bool = True, residuals: Sequence[ResidualGroup] = ()
                      ) -> tuple[dict[str, dict[tuple[str, Any], float]], dict[str, float]]:
    """Loss change on (x, y) when one layer alone takes one factor of a choice (a code set, a
    keep ratio, a rank), or one residual group alone a keep; the rest of the model stays as
    trained. Returns ({layer or residual group name: {("codes"|"keep"|"rank", value): Δloss}},
    {"slope": points per unit loss, "base_*"}). The drop of a whole choice is the slope times
    the sum of its factors' loss changes.

    Each changed model has its BatchNorm statistics re-estimated on ``x`` before it is scored,
    as the compiled model's are (fine-tuning ends with that recalibration; BN folds into the
    conv after it): a pruned or projected layer shifts the statistics of every layer after it,
    and scoring with the float model's statistics charged that shift to the layer. On ResNet-8,
    uniform pow2-4 projection scores 59 % with the old statistics, 82 % recalibrated, and 82 %
    after ADMM fine-tuning."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from lastbit.passes.admm import recalibrate_bn
    from lastbit.passes.sensitivity import additive_drop_model, lowrank_weight, quantized_weight, score

    def recalibrated_score(changed):
        return score(recalibrate_bn(changed, (x, y), num_batches=max(1, len(x) // 64)), x, y)

    base = recalibrated_score(copy.deepcopy(module))  # the same 512-sample statistics as every change
    jobs = []  # (layer or residual group, factor, value, the LayerConfig that prunes for a keep)
    for site in sites:
        jobs += [(site.name, "codes", c, None) for c in site.codes if c != FLOAT_CODES]
        jobs += [(site.name, "keep", k, LayerConfig({site.name: LayerChoice(FLOAT_CODES, keep=k)}))
                 for k in site.keeps if k < 1.0]
        jobs += [(site.name, "rank", r, None) for r in site.ranks if r is not None]
    for residual in residuals:
        jobs += [(residual.name, "keep", k, residual.config(k)) for k in residual.keeps if k < 1.0]
    modules = dict(module.named_modules())
    deltas: dict[str, dict[tuple[str, Any], float]] = {n: {} for n in [*(s.name for s in sites),
                                                                          *(r.name for r in residuals)]}
    loss_d, acc_d = [], []
    for name, kind, value, pruned in tqdm(jobs, desc="layer sensitivity", disable=not progress):
        if pruned is not None:
            changed = restructure_module(module, graph, pruned, lanes)
        else:
            w = modules[name].weight.detach().numpy()
            new = quantized_weight(w, value) if kind == "codes" else lowrank_weight(w, value)
            changed = copy.deepcopy(module)
            with torch.no_grad():
                dict(changed.named_modules())[name].weight.copy_(torch.as_tensor(new))
        s = recalibrated_score(changed)
        deltas[name][(kind, value)] = s.loss - base.loss
        loss_d.append(s.loss - base.loss)
        acc_d.append(100.0 * (base.accuracy - s.accuracy))
    slope = additive_drop_model(np.array(loss_d), np.array(acc_d))
    return deltas, {"slope": slope, "base_loss": base.loss, "base_accuracy": base.accuracy}


def choice_drop(deltas: dict[tuple[str, Any], float], choice: LayerChoice, slope: float) -> float:
    """Predicted accuracy drop (points) of one layer's choice: slope × Σ factor loss changes."""
    total = 0.0
    if choice.codes != FLOAT_CODES:
        total += max(deltas.get(("codes", choice.codes), 0.0), 0.0)
    if choice.keep < 1.0:
        total += max(deltas.get(("keep", choice.keep), 0.0), 0.0)
    if choice.rank is not None:
        total += max(deltas.get(("rank", choice.rank), 0.0), 0.0)
    return slope * total


# --- the search ------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One searched configuration with its predicted cost, drop and bytes."""

    config: LayerConfig
    cost: float
    drop: float
    bytes: float
    latency_ms: float | None = None

    def to_json(self) -> dict:
        return {"cost": self.cost, "predicted_drop": self.drop, "weight_bytes": self.bytes,
                "latency_ms": self.latency_ms, "layers": self.config.to_dict()["layers"]}


@dataclass
class SearchTables:
    """Per group: each option's config entries, cost (objective), drop, bytes, latency; and the
    residual groups' keeps these groups' channels were priced at, with their summed drop."""

    groups: list[SiteGroup]
    cost: list[np.ndarray]
    drop: list[np.ndarray]
    bytes: list[np.ndarray]
    latency: list[np.ndarray]
    residuals: Sequence[ResidualGroup] = ()
    residual_keeps: tuple[float, ...] = ()  # one per residual group
    residual_drop: float = 0.0

    def choice(self, site: LayerSite, choice: LayerChoice) -> LayerChoice:
        """``choice`` with the keep of the residual group ``site`` produces, if any."""
        for residual, keep in zip(self.residuals, self.residual_keeps):
            if site.name in residual.producers:
                return dataclasses.replace(choice, keep=keep)
        return choice


def option_tables(groups: list[SiteGroup], costs: CostTable, deltas, slope: float, metric: str) -> SearchTables:
    """The knapsack's inputs: for every option of every group, the objective, drop, bytes."""
    cost, drop, nbytes, latency = [], [], [], []
    for group in groups:
        c, d, b, lat = [], [], [], []
        for option in group.options:
            pts = group.points(option)
            vals = [costs.values.get(p) for p in pts]
            ok = all(v is not None and metric in v for v in vals)
            c.append(sum(v[metric] for v in vals) if ok else np.inf)
            lat.append(sum(v.get("latency_ms", np.nan) for v in vals) if ok else np.inf)
            b.append(float(sum(p.weight_bytes for p in pts)))
            d.append(sum(choice_drop(deltas[s.name], ch, slope) for s, ch in zip(group.sites, option)))
        cost.append(np.array(c))
        drop.append(np.array(d))
        nbytes.append(np.array(b))
        latency.append(np.array(lat))
    return SearchTables(groups, cost, drop, nbytes, latency)


def combo_tables(combos: list[ResidualCombo], residuals: Sequence[ResidualGroup], costs: CostTable, deltas,
                 slope: float, metric: str) -> list[SearchTables]:
    """``option_tables`` for every residual-keep combination, with the combination's own drop:
    slope × Σ the loss change of each residual group at its keep (``deltas[group.name]``)."""
    tables = []
    for combo in combos:
        loss = 0.0
        for residual, keep in zip(residuals, combo.keeps):
            if keep < 1.0:
                measured = deltas.get(residual.name, {})
                if ("keep", keep) not in measured:
                    raise LastbitError(f"codesign: no sensitivity for residual group {residual.name} at keep "
                                       f"{keep:g} (measured for other lanes?); run layer_sensitivity with it")
                loss += max(measured[("keep", keep)], 0.0)
        table = option_tables(combo.groups, costs, deltas, slope, metric)
        tables.append(dataclasses.replace(table, residuals=residuals, residual_keeps=combo.keeps,
                                          residual_drop=slope * loss))
    return tables


def search(tables: Sequence[SearchTables], max_drop: float, bins: int = 2000) -> Candidate | None:
    """The least-cost configuration whose predicted drop is within ``max_drop``, over every
    residual-keep combination (one ``SearchTables`` each): each combination's knapsack gets the
    budget its residual keeps leave and is exact up to the drop rounding of passes/knapsack.py;
    the combinations are enumerated, so the answer is the exact optimum of the product space
    under the same rounding. Ties keep the earlier combination (all residual keeps 1 first)."""
    from lastbit.passes.knapsack import solve_knapsack

    best = None
    for table in tables:
        budget = max_drop - table.residual_drop
        if budget < 0:
            continue
        cand = _candidate(table, solve_knapsack(table.cost, table.drop, budget, bins).pick(budget))
        if cand is not None and (best is None or cand.cost < best.cost):
            best = cand
    return best


def _candidate(tables: SearchTables, picks: list[int] | None) -> Candidate | None:
    if picks is None:
        return None
    layers, cost, drop, nbytes, lat = {}, 0.0, tables.residual_drop, 0.0, 0.0
    for g, (group, i) in enumerate(zip(tables.groups, picks)):
        for site, choice in zip(group.sites, group.options[i]):
            layers[site.name] = tables.choice(site, choice)
        cost += tables.cost[g][i]
        drop += tables.drop[g][i]
        nbytes += tables.bytes[g][i]
        lat += tables.latency[g][i]
    return Candidate(LayerConfig(layers), float(cost), float(drop), float(nbytes), float(lat))


def pareto_front(tables: Sequence[SearchTables], max_drop: float, steps: int = 40,
                 bins: int = 2000) -> list[Candidate]:
    """Non-dominated (drop, latency, bytes) configurations over every residual-keep
    combination: per combination the knapsack minimising the objective and the one minimising
    bytes, each at ``steps`` budgets up to 3 × max_drop."""
    from lastbit.passes.knapsack import pareto_mask, solve_knapsack

    top = 3.0 * max_drop if max_drop > 0 else 1.0
    found: dict[str, Candidate] = {}
    for tab in tables:
        if tab.residual_drop > top:
            continue
        for objective in (tab.cost, tab.bytes):
            table = solve_knapsack(objective, tab.drop, top - tab.residual_drop, bins)
            for budget in np.linspace(0.0, top, steps):
                if budget >= tab.residual_drop:
                    cand = _candidate(tab, table.pick(float(budget - tab.residual_drop)))
                    if cand is not None:
                        found.setdefault(cand.config.to_json(), cand)
    cands = list(found.values())
    if not cands:
        return []
    pts = np.array([[c.drop, c.latency_ms if np.isfinite(c.latency_ms) else c.cost, c.bytes] for c in cands])
    keep = pareto_mask(pts)
    return sorted([c for c, k in zip(cands, keep) if k], key=lambda c: c.drop)


def plot_front(front: list[Candidate], chosen: Candidate | None, path: Path, title: str,
               uniform: dict[str, Candidate] | None = None) -> Path:
    """Predicted drop × cost, bytes as colour, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lastbit.fileio import atomic_write_bytes, figure_png

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [c.drop for c in front]
    ys = [c.latency_ms if c.latency_ms is not None and np.isfinite(c.latency_ms) else c.cost for c in front]
    sc = ax.scatter(xs, ys, c=[c.bytes / 1e3 for c in front], cmap="viridis", s=24, label="Pareto front")
    fig.colorbar(sc, ax=ax, label="weight KB")
    if chosen is not None:
        ax.scatter([chosen.drop], [chosen.latency_ms if np.isfinite(chosen.latency_ms) else chosen.cost],
                   marker="*", s=220, c="red", label="chosen")
    for name, c in (uniform or {}).items():
        y = c.latency_ms if c.latency_ms is not None and np.isfinite(c.latency_ms) else c.cost
        ax.scatter([c.drop], [y], marker="x", s=60, c="black")
        ax.annotate(name, (c.drop, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("predicted accuracy drop (points)")
    ax.set_ylabel("predicted cost (sum of per-layer)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig))


def evaluate_config(tables: Sequence[SearchTables], config: LayerConfig, lanes: int = 8) -> Candidate:
    """Predicted cost/drop/bytes of a given configuration (e.g. a uniform baseline): the
    residual-keep combination and each group's option matching the config (a layer the config
    omits takes int8, full, no rank). A keep becomes the channel count the pruning pass keeps
    at ``lanes``, then the offered option nearest to that count; a residual group takes the
    keep its producers ask for (the smallest, as the pass prunes it once)."""
    def option(keeps: tuple[float, ...], kept: tuple[int, ...], channels: int, keep: float) -> float:
        if len(keeps) < 2:
            return keeps[0]
        count = kept_channel_count(channels, keep, lanes)
        return keeps[min(range(len(kept)), key=lambda i: abs(kept[i] - count))]

    residuals = tables[0].residuals
    combo = tuple(option(r.keeps, r.kept_channels, r.channels,
                         min(config.layers.get(p, LayerChoice()).keep for p in r.producers)) for r in residuals)
    chosen = next(t for t in tables if t.residual_keeps == combo)
    picks = []
    for group in chosen.groups:
        want = tuple(config.layers.get(s.name, LayerChoice()) for s in group.sites)
        want = tuple(LayerChoice(c.codes, option(s.keeps, s.kept_channels, s.out_channels, c.keep),
                                 c.rank if c.rank in s.ranks else None) for s, c in zip(group.sites, want))
        picks.append(group.options.index(want))
    return _candidate(chosen, picks)


def uniform_configs(sites: list[LayerSite]) -> dict[str, LayerConfig]:
    """The uniform baselines of the issue: int8 everywhere; 3-bit (pow2-4) with the first and
    last layers at int8 (the project's default Squeeze(bits=3)); and that with every prunable
    group, residual ones included, at keep 0.7 (the pass rounds it to whole SIMD blocks)."""
    first_last = {sites[0].name, sites[-1].name}

    def three_bit(name: str) -> str:
        return "int8" if name in first_last else "pow2-4"

    return {
        "uniform int8": LayerConfig({s.name: LayerChoice("int8") for s in sites}),
        "uniform 3-bit": LayerConfig({s.name: LayerChoice(three_bit(s.name)) for s in sites}),
        # keep 0.7 on every layer prunes every group, residual ones too, by 30 % like
        # Squeeze(prune=0.3), rounded to whole SIMD blocks as the pruning pass rounds it
        "uniform 3-bit + 30% prune": LayerConfig({s.name: LayerChoice(three_bit(s.name), 0.7) for s in sites}),
    }


# --- closing the loop: the real accuracy of what the search picks ------------------------------


@dataclass
class Verified:
    """One configuration fine-tuned and scored: its predicted and its real accuracy drop."""

    label: str  # "uniform 3-bit", "search 1", ...
    candidate: Candidate
    accuracy: float  # top-1 (0..1) on the validation data after fine-tuning
    drop: float  # points below the fp32 model on the same data
    budget: float | None = None  # the predicted-drop budget the search ran at (None: a uniform baseline)
    measured_cost: float | None = None  # the whole compiled model's cost (measured for points within budget)

    @property
    def cost(self) -> float:
        """The measured whole-model cost where there is one, else the summed per-layer prediction."""
        return self.measured_cost if self.measured_cost is not None else self.candidate.cost

    def to_json(self) -> dict:
        return {"label": self.label, "accuracy": self.accuracy, "drop": self.drop, "search_budget": self.budget,
                "measured_cost": self.measured_cost, **self.candidate.to_json()}


@dataclass
class Verification:
    """What ``verify_search`` scored and picked."""

    fp32_accuracy: float
    max_drop: float
    tried: list[Verified]
    chosen: Verified | None  # the cheapest tried configuration within max_drop (None: none is)

    def to_json(self) -> dict:
        return {"fp32_accuracy": self.fp32_accuracy, "max_drop": self.max_drop,
                "chosen": self.chosen.label if self.chosen else None, "tried": [v.to_json() for v in self.tried]}


def verify_search(tables: Sequence[SearchTables], uniform: dict[str, Candidate], score, fp32_accuracy: float,
                  max_drop: float, rounds: int = 3, progress: bool = True, measure=None,
                  tie: float = COST_TIE) -> Verification:
    """Close the loop on the search's accuracy model. The predicted drop sums single-layer loss
    changes before any fine-tuning; the real drop is what fine-tuning leaves, and the two differ
    either way, by more than a point on ResNet-8 (README, co-design search). ``score(config)``
    fine-tunes a configuration and returns its top-1 on validation data (not the test data the
    result is reported on); ``fp32_accuracy`` is the fp32 model's on the same data.

    The uniform baselines are scored first, then up to ``rounds`` searches: each at the budget
    that would have made the last pick's real drop ``max_drop`` if real drop is proportional to
    predicted (budget = max_drop × predicted / real, at most ×4 either way). It stops early when
    a search returns a configuration already scored. The answer is the cheapest scored
    configuration whose real drop is within ``max_drop`` (never a costlier one than a uniform
    baseline that meets the budget; None when nothing scored does); points within ``tie``
    (COST_TIE, 2 %) of the cheapest count as equally cheap, and the most accurate of them wins.
    ``measure(config)``, when given, costs each scored configuration that fits the budget as
    a whole compiled model, and the answer is chosen by that cost: the per-layer costs add up to a prediction
    that can miss the whole model (x86: a point predicted 7 % cheaper than uniform 3-bit
    timed the same)."""
    from tqdm.auto import tqdm

    if rounds < 1:
        raise LastbitError(f"verification needs at least one search round, got {rounds}")
    tried: dict[str, Verified] = {}
    bar = tqdm(total=len(uniform) + rounds, desc="verifying (fine-tune + score)", disable=not progress, leave=False)

    def scored(label: str, cand: Candidate, budget: float | None) -> Verified:
        key = cand.config.to_json()
        if key not in tried:
            accuracy = float(score(cand.config))
            tried[key] = Verified(label, cand, accuracy, 100.0 * (fp32_accuracy - accuracy), budget)
            log.info("verify: %s predicted %.2f pt, real %.2f pt", label, cand.drop, tried[key].drop)
        bar.update(1)
        return tried[key]

    try:
        for name, cand in uniform.items():
            if np.isfinite(cand.cost):
                scored(name, cand, None)
        budget = max_drop
        for r in range(rounds):
            cand = search(tables, budget)
            if cand is None:
                break
            seen = cand.config.to_json() in tried
            v = scored(f"search {r + 1}", cand, budget)
            if seen and r > 0:
                break
            real, predicted = max(v.drop, 0.05), max(cand.drop, 0.05)  # floors: a drop at or below zero
            budget = float(np.clip(max_drop * predicted / real, budget / 4, budget * 4))
    finally:
        bar.close()
    within = [v for v in tried.values() if v.drop <= max_drop + 1e-9]
    if measure is not None:  # only the points that fit can be chosen: the others are not compiled for the target
        for v in within:
            v.measured_cost = float(measure(v.candidate.config))
    chosen = None
    if within:
        cheapest = min(v.cost for v in within)
        chosen = max((v for v in within if v.cost <= cheapest * (1 + tie)), key=lambda v: (v.accuracy, -v.cost))
    return Verification(fp32_accuracy, max_drop, list(tried.values()), chosen)


# --- fine-tuning and the whole flow --------------------------------------------------------------


def finetune_config(module, example, graph: Graph, config: LayerConfig, data, target: str = "x86_64-linux-gnu",
                    epochs: int = 1, lanes: int = 8, name: str = "model", method: str = "admm",
                    recover: float = RECOVER_FRACTION, **admm):
    """Compile ``config`` for real: pruning and low-rank applied to the torch module, then
    fine-tuning onto the per-layer code sets by ``method`` ("admm" or "ste", as
    ``Squeeze.mode``) (``data`` (X, y); X alone or None: data-free projection, X calibrating
    the activation scales).

    With labelled (X, y) arrays, the first ``recover`` share of the images trains the restructured
    module in float first (``epochs`` epochs, plain SGD) and the rest fine-tunes it onto the
    codes, so the codes are picked from recovered weights at the same total budget."""
    import lastbit

    from lastbit.squeeze import FINETUNE_MODES, data_has_labels

    if method not in FINETUNE_MODES:
        raise LastbitError(f"unknown fine-tuning method {method!r}; known: {', '.join(FINETUNE_MODES)}")
    if not 0.0 <= recover < 1.0:
        raise LastbitError(f"recover must be a share of the images in [0, 1), got {recover!r}")
    restructured = restructure_module(module, graph, config, lanes)
    labelled = data_has_labels(data)
    if labelled and recover > 0 and isinstance(data, (tuple, list)):  # (X, y) arrays; batches as they come
        from lastbit.passes.prune_finetune import finetune

        images, labels = data
        split = int(len(labels) * recover)
        finetune(restructured, (images[:split], labels[:split]), epochs, lr=admm.get("lr", 0.01),
                 batch_size=admm.get("batch_size", 64), progress=False)
        restructured.eval()
        data = (images[split:], labels[split:])
    mode = method if labelled else "data-free"  # X alone only calibrates activations
    squeeze = lastbit.Squeeze(layers=codes_only(config), data=data, mode=mode, epochs=epochs,
                              admm_options=admm)
    return lastbit.compile(restructured, target, (example,), name=name, squeeze=squeeze)


def retarget(artifact, config: LayerConfig, target: str, example, calibration: np.ndarray, name: str = "model"):
    """The weights ``finetune_config`` trained for the host ``artifact``, compiled for ``target``
    without training again: the codes are projected anew from weights that already sit on them,
    and the activation scales are calibrated on the ``calibration`` inputs."""
    import lastbit

    squeeze = lastbit.Squeeze(layers=codes_only(config), data=calibration, mode="data-free")
    return lastbit.compile(artifact.torch_module, target, (example,), name=name, squeeze=squeeze)


@dataclass
class CodesignResult:
    """What ``run_codesign`` found and where it wrote it."""

    chosen: Candidate | None
    front: list[Candidate]
    uniform: dict[str, Candidate]
    cost_scores: dict[str, Any]
    timings: dict[str, float]
    sites: list[LayerSite]
    sensitivity: dict[str, float]
    measured_points: int
    predicted_points: int
    graph: Any = None  # the imported model the search ran on (compile the chosen point from it)
    deltas: dict = field(default_factory=dict)  # layer_sensitivity's loss changes (reusable)
    lanes: int = 8  # the channel multiple the keeps were rounded to
    residuals: list[ResidualGroup] = field(default_factory=list)  # searched over, one combination at a time
    tables: list[SearchTables] = field(default_factory=list)  # the knapsack inputs (search again at another budget)

    def to_json(self) -> dict:
        return {
            "chosen": self.chosen.to_json() if self.chosen else None,
            "pareto_front": [c.to_json() for c in self.front],
            "uniform": {k: v.to_json() for k, v in self.uniform.items()},
            "cost_model": self.cost_scores,
            "timings_s": self.timings,
            "sensitivity": self.sensitivity,
            "measured_points": self.measured_points,
            "predicted_points": self.predicted_points,
            "residual_groups": {r.name: {"channels": r.channels, "kept_channels": list(r.kept_channels)}
                                for r in self.residuals},
            "residual_combinations": int(np.prod([len(r.keeps) for r in self.residuals])),
        }


def run_codesign(module, example, target: str, calibration: tuple[np.ndarray, np.ndarray], out_dir: "str | Path",
                 objective: str = "latency", max_drop: float = 1.0, cache_path: "str | Path | None" = None,
                 measure_share: float = 0.3, max_measure: int | None = None, codes: Sequence[str] = CODES,
                 ranks: bool = True, name: str = "model", progress: bool = True,
                 source: CostSource | None = None, sensitivity: "tuple[dict, dict] | None" = None) -> CodesignResult:
    """Sites → measured/predicted costs → sensitivities → exact search → Pareto front; writes
    ``config.json`` (the chosen point), ``pareto.json`` and ``pareto.png`` into ``out_dir``.
    ``sensitivity``: what ``layer_sensitivity`` returned for these sites before (a search for
    a second target with the same channel lanes reuses it rather than measuring it again)."""
    from lastbit.codesign_cost import cost_source
    from lastbit.fileio import atomic_write_json
    from lastbit.pipeline import _channel_multiple, import_model
    from lastbit.targets import get_target

    if objective not in OBJECTIVES:
        raise LastbitError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if not max_drop >= 0:
        raise LastbitError(f"max_drop must be ≥ 0 points, got {max_drop!r}")
    out_dir = Path(out_dir)
    t = get_target(target)
    source = source or cost_source(t.triple)
    metric = OBJECTIVES[objective]
    if metric not in (*source.metrics, "weight_bytes"):
        raise LastbitError(f"objective {objective!r} needs {metric}, which {source.name} does not measure "
                           f"({', '.join(source.metrics)})")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    graph = import_model(module, (example,), name=name)
    lanes = _channel_multiple(t)
    site_codes = [c for c in codes if not (c == FLOAT_CODES and t.runner == "sim")]  # float layers do not run there
    sites = model_sites(graph, lanes, codes=site_codes, ranks=ranks)
    residuals = residual_groups(graph, sites, lanes)
    combos = residual_combos(sites, residuals)
    cache = CostCache(cache_path or (out_dir / "cost-cache.json"))
    costs = measure_costs(combos[0].groups, source, cache, measure_share, max_measure, progress=progress,
                          extra=[c.groups for c in combos[1:]])
    timings["measure"] = costs.measure_s
    t0 = time.perf_counter()
    deltas, sens = sensitivity or layer_sensitivity(module, graph, sites, *calibration, lanes=lanes,
                                                    progress=progress, residuals=residuals)
    timings["sensitivity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables = combo_tables(combos, residuals, costs, deltas, sens["slope"], metric)
    chosen = search(tables, max_drop)
    front = pareto_front(tables, max_drop)
    uniform = {k: evaluate_config(tables, c, lanes) for k, c in uniform_configs(sites).items()}
    timings["search"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    result = CodesignResult(chosen, front, uniform, costs.model_scores, timings, sites, sens,
                            measured_points=len(costs.measured), predicted_points=len(costs.values) - len(costs.measured),
                            graph=graph, deltas=deltas, lanes=lanes, residuals=residuals, tables=tables)
    if chosen is not None:
        chosen.config.to_json(out_dir / "config.json")
    else:  # nothing fits the budget: no chosen point, and no older run's beside this pareto.json
        (out_dir / "config.json").unlink(missing_ok=True)
    atomic_write_json(out_dir / "pareto.json", {"model": name, "target": t.triple, "objective": objective,
                                                "max_drop": max_drop, **result.to_json()})
    plot_front(front, chosen, out_dir / "pareto.png", f"{name} on {t.triple}: {objective} vs predicted drop", uniform)
    return result

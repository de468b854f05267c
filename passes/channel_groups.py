"""Channel dependency analysis over a Relax graph: which indices of which tensor axes must be
removed together when a channel is pruned.

Every index along every axis of every tensor gets an integer *label*; the ops of ``main`` tie
labels together (a residual add ties its two operands index by index, a conv ties its input
channels to its weight's input axis, a BatchNorm ties its γ/β/mean/var to its channel axis,
concat concatenates label lists, flatten repeats each channel's label over the folded
positions, …) and a union-find merges them. A *channel* is then one union-find class, and
removing it means deleting every index whose label is in that class, from every parameter,
constant and reshape target: the shapes stay consistent through any graph the rules cover.

What the rules do not understand is never guessed at: the labels an unknown op touches, the
model inputs and outputs, spatial and batch axes are *pinned* with a reason naming the node,
and a pinned channel is never removed. So a graph that cannot be pruned safely at a node says
why, and that node's channels stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lastbit.graph import Graph

log = logging.getLogger(__name__)

__all__ = ["ChannelAnalysis", "ChannelGroup", "Producer", "analyze_channels"]

# Ops that keep the shape of their (first) input and act on each element (or each channel) alone.
_ELEMENTWISE_UNARY = {
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid", "relax.tanh",
    "relax.clip", "relax.astype", "relax.zeros_like", "relax.ones_like", "relax.full_like", "relax.exp",
    "relax.negative", "relax.sqrt", "relax.rsqrt", "relax.abs", "relax.nn.leakyrelu", "relax.round",
    "relax.floor", "relax.ceil", "relax.square", "relax.log", "relax.erf", "relax.nn.selu", "relax.nn.softplus",
    "relax.hardswish", "relax.nn.hardswish", "relax.sin", "relax.cos",
}
_ELEMENTWISE_BINARY = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.power", "relax.floor_divide",
}
_POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d",
          "relax.nn.max_pool1d", "relax.nn.avg_pool1d", "relax.nn.adaptive_avg_pool1d"}
_REDUCTIONS = {"relax.mean", "relax.sum", "relax.max", "relax.min", "relax.prod", "relax.variance", "relax.std"}
_RESHAPES = {"relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten"}
_CONVS = {"relax.nn.conv2d": ("NCHW", "OIHW"), "relax.nn.conv1d": ("NCW", "OIW")}


@dataclass(frozen=True)
class Producer:
    """A conv/dense layer whose output channels come from a parameter: what pruning removes."""

    layer: str  # the Relax var the layer binds ("lv6")
    kind: str  # "conv2d", "conv1d", "dense"
    weight: str  # the weight parameter
    axis: int  # its output-channel axis
    labels: np.ndarray = field(repr=False, compare=False)


@dataclass
class ChannelGroup:
    """Layers whose output channels must be pruned together (a residual chain, a concat…).

    ``channels`` lists the union-find classes of the group in the first producer's channel
    order; ``pinned`` maps the classes that must stay to the reason.
    """

    producers: list[Producer]
    channels: list[int]
    pinned: dict[int, str]

    @property
    def prunable(self) -> list[int]:
        return [c for c in self.channels if c not in self.pinned]

    @property
    def reason(self) -> str:
        """Why no channel of this group can be removed ('' when some can)."""
        if self.prunable:
            return ""
        return next(iter(self.pinned.values()), "no channels")

    @property
    def name(self) -> str:
        return "+".join(p.weight for p in self.producers)


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_channels`: groups, and the labels to slice every tensor by."""

    groups: list[ChannelGroup]
    param_labels: dict[str, list[np.ndarray]]  # parameter -> one label array per axis
    const_labels: list[tuple[Any, list[np.ndarray]]]  # (relax constant, labels per axis)
    var_labels: dict[Any, list[np.ndarray]]  # bound relax Var -> labels per axis (tensors only)
    bn_gammas: list[str]  # parameters that are a batch_norm's γ
    _parent: np.ndarray = field(repr=False)

    def find(self, labels: np.ndarray) -> np.ndarray:
        """The class (union-find root) of each label."""
        return self._parent[np.asarray(labels, dtype=np.int64)]

    def keep_indices(self, labels: np.ndarray, removed: set[int]) -> np.ndarray:
        """Indices along an axis that survive removing the classes in ``removed``."""
        if not removed:
            return np.arange(len(labels))
        classes = self.find(labels)
        return np.flatnonzero(~np.isin(classes, np.fromiter(removed, dtype=np.int64)))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: dict[int, str] = {}

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def root(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self.parent[ry] = rx

    def pin(self, labels: np.ndarray, reason: str) -> None:
        for label in labels.tolist():
            self.pinned.setdefault(label, reason)

    def roots(self) -> np.ndarray:
        return np.array([self.root(i) for i in range(len(self.parent))], dtype=np.int64)


def _shape(ty) -> tuple[int, ...] | None:
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None  # symbolic dimension


class _Analyzer:
    """Walks ``main`` once, binding by binding, and applies one rule per op."""

    def __init__(self, graph: Graph):
        import tvm
        from tvm import relax

        self.relax = relax
        self.constant_type = tvm.ir.expr.Constant
        self.graph = graph
        self.uf = _UnionFind()
        self.labels: dict[Any, Any] = {}  # Var -> list of label arrays (tensor) or list of those (tuple)
        self.param_of: dict[Any, str] = {}
        self.param_labels: dict[str, list[np.ndarray]] = {}
        self.const_labels: list[tuple[Any, list[np.ndarray]]] = []
        self.param_label_ids: set[int] = set()
        self.producers: list[Producer] = []
        self.bn_gammas: list[str] = []
        main = graph.mod["main"]
        n_in = len(graph.inputs)
        for var in main.params[:n_in]:
            self.labels[var] = self._fresh_for(var.ty, pinned=f"model input '{var.name}'")
        for var, name in graph.param_vars().items():
            axes = [self.uf.fresh(n) for n in graph.params[name].shape]
            self.param_of[var] = name
            self.param_labels[name] = axes
            for a in axes:
                self.param_label_ids.update(a.tolist())
            self.labels[var] = axes

    # -- labels of expressions ----------------------------------------------------------------
    def _fresh_for(self, ty, pinned: str = ""):
        relax = self.relax
        if isinstance(ty, relax.TupleType):
            return [self._fresh_for(f, pinned) for f in ty.fields]
        shape = _shape(ty)
        if shape is None:
            return None
        axes = [self.uf.fresh(n) for n in shape]
        if pinned:
            for a in axes:
                self.uf.pin(a, pinned)
        return axes

    def of(self, expr):
        """Labels of an argument: per axis for a tensor, per field for a tuple."""
        relax = self.relax
        if isinstance(expr, relax.Var):
            if expr not in self.labels:
                self.labels[expr] = self._fresh_for(expr.ty, pinned=f"free variable '{expr.name}'")
            return self.labels[expr]
        if isinstance(expr, relax.Tuple):
            return [self.of(f) for f in expr.fields]
        if isinstance(expr, relax.TupleGetItem):
            return self.of(expr.tuple_value)[int(expr.index)]
        if isinstance(expr, self.constant_type):
            for const, axes in self.const_labels:
                if const.same_as(expr):
                    return axes
            axes = self._fresh_for(expr.ty)
            if axes is not None:
                self.const_labels.append((expr, axes))
            return axes
        return None

    def pin_all(self, labels, reason: str) -> None:
        if labels is None:
            return
        if isinstance(labels, np.ndarray):
            self.uf.pin(labels, reason)
            return
        for item in labels:
            self.pin_all(item, reason)

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> None:
        relax = self.relax
        main = self.graph.mod["main"]
        for block in main.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    self.pin_all(self._fresh_for(binding.var.ty), "match_cast")
                    continue
                self.labels[binding.var] = self._bind(binding.var, binding.value)
        self.pin_all(self.of(main.body.body), "model output")

    def _bind(self, var, value):
        relax = self.relax
        if isinstance(value, (relax.Var, relax.Tuple, relax.TupleGetItem, self.constant_type)):
            return self.of(value)
        if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
            return self._unknown(var, value, "a call of a function, not an operator")
        op = value.op.name
        out_shape = _shape(var.ty)
        try:
            if op in _ELEMENTWISE_UNARY:
                return self._unary(var, value)
            if op in _ELEMENTWISE_BINARY:
                return self._broadcast(var, [value.args[0], value.args[1]])
            if op in _CONVS:
                return self._conv(var, value, *_CONVS[op])
            if op == "relax.matmul":
                return self._matmul(var, value)
            if op == "relax.permute_dims":
                return self._permute(var, value)
            if op in _RESHAPES:
                return self._reshape(var, value)
            if op == "relax.nn.batch_norm":
                return self._batch_norm(var, value)
            if op in _POOLS:
                return self._pool(var, value)
            if op in _REDUCTIONS:
                return self._reduce(var, value)
            if op == "relax.concat":
                return self._concat(var, value)
            if op in ("relax.nn.softmax", "relax.nn.log_softmax"):
                return self._softmax(var, value)
            if op == "relax.nn.pad":
                return self._pad(var, value)
            if op == "relax.call_tir":
                binary = elementwise_call_tir_op(self.graph.mod, value)
                if binary is not None:
                    return self._broadcast(var, list(value.args[1].fields))
                return self._unknown(var, value, "a TensorIR function that is not a plain elementwise map")
        except _Unsupported as why:
            return self._unknown(var, value, str(why))
        if out_shape is None and not isinstance(var.ty, relax.TupleType):
            return self._unknown(var, value, "symbolic shape")
        return self._unknown(var, value, "channel flow through this op is not modelled")

    def _unknown(self, var, value, why: str):
        relax = self.relax
        op = value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else type(value).__name__
        reason = f"{op} at '{var.name}': {why}"
        if isinstance(value, relax.Call):
            for arg in value.args:
                self.pin_all(self.of(arg), reason)
        return self._fresh_for(var.ty, pinned=reason)

    # -- rules ----------------------------------------------------------------------------------
    def _tensor(self, expr) -> list[np.ndarray]:
        labels = self.of(expr)
        if labels is None or (labels and not isinstance(labels[0], np.ndarray)):
            raise _Unsupported(f"operand {expr} is not a tensor of known shape")
        return labels

    def _unary(self, var, call):
        x = self._tensor(call.args[0])
        if _shape(var.ty) != tuple(len(a) for a in x):
            raise _Unsupported("output shape differs from the input's")
        return list(x)

    def _broadcast(self, var, operands) -> list[np.ndarray]:
        out_shape = _shape(var.ty)
        if out_shape is None:
            raise _Unsupported("symbolic shape")
        out: list[np.ndarray | None] = [None] * len(out_shape)
        for operand in operands:
            labels = self._tensor(operand)
            offset = len(out_shape) - len(labels)
            for axis, lab in enumerate(labels):
                j = axis + offset
                if len(lab) != out_shape[j]:
                    continue  # a size-1 broadcast axis: nothing to tie
                if out[j] is None:
                    out[j] = lab
                else:
                    self.uf.union(out[j], lab)
        return [lab if lab is not None else self.uf.fresh(n) for lab, n in zip(out, out_shape)]

    def _conv(self, var, call, data_layout: str, kernel_layout: str):
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
        if layouts != (data_layout, kernel_layout, data_layout):
            raise _Unsupported(f"layouts {layouts}, only {data_layout}/{kernel_layout}")
        x, w = self._tensor(call.args[0]), self._tensor(call.args[1])
        groups = int(attrs.groups)
        reason = f"{call.op.name} at '{var.name}'"
        for a in range(2, len(x)):
            self.uf.pin(x[a], f"{reason}: spatial axis")
        for a in range(2, len(w)):
            self.uf.pin(w[a], f"{reason}: kernel window")
        self.uf.pin(x[0], f"{reason}: batch axis")
        out = self._fresh_for(var.ty, pinned=f"{reason}: spatial/batch axis")
        c_in, c_out = len(x[1]), len(w[0])
        if groups == 1:
            self.uf.union(x[1], w[1])
            out[1] = w[0]
            self._producer(var, "conv2d" if len(x) == 4 else "conv1d", call.args[1], 0, w[0])
        elif groups == c_in == c_out and len(w[1]) == 1:  # depthwise: channel i in, channel i out
            self.uf.union(x[1], w[0])
            self.uf.pin(w[1], f"{reason}: depthwise kernel axis")
            out[1] = x[1]
        else:
            why = f"{reason}: grouped conv (groups={groups}, {c_in} in, {c_out} out) ties channels across groups"
            self.pin_all([x[1], w[0], w[1]], why)
            self.uf.pin(out[1], why)
        return out

    def _matmul(self, var, call):
        a, b = self._tensor(call.args[0]), self._tensor(call.args[1])
        if len(a) < 2 or len(b) < 2:
            raise _Unsupported("matmul with a 1-D operand")
        out_shape = _shape(var.ty)
        reason = f"relax.matmul at '{var.name}'"
        self.uf.union(a[-1], b[-2])
        out = self._fresh_for(var.ty, pinned=f"{reason}: batch axis")
        out[-1], out[-2] = b[-1], a[-2]
        for lab in list(a[:-1]) + list(b[:-2]):  # rows and batch axes: not channels of this layer
            if len(lab) > 1:
                self.uf.pin(lab, f"{reason}: row/batch axis")
        if len(out_shape) != len(out):
            raise _Unsupported("unexpected matmul output rank")
        self._producer(var, "dense", call.args[1], -1, b[-1])
        return out

    def _producer(self, var, kind: str, weight_expr, axis: int, labels: np.ndarray) -> None:
        """Record a layer whose output channels are a parameter's axis (directly or through views)."""
        if len(labels) == 0 or int(labels[0]) not in self.param_label_ids:
            return
        for name, axes in self.param_labels.items():
            for p_axis, p_labels in enumerate(axes):
                if p_labels is labels or (len(p_labels) == len(labels) and np.array_equal(p_labels, labels)):
                    self.producers.append(Producer(var.name, kind, name, p_axis, labels))
                    return

    def _permute(self, var, call):
        x = self._tensor(call.args[0])
        order = call.attrs.axes
        order = list(reversed(range(len(x)))) if order is None else [int(a) % len(x) for a in order]
        return [x[a] for a in order]

    def _reshape(self, var, call):
        """A pure reshape: each input axis maps to the output axis with the same number of
        elements before it, repeated over the axes folded into it (flatten → dense)."""
        x = self._tensor(call.args[0])
        in_shape = [len(a) for a in x]
        out_shape = _shape(var.ty)
        if out_shape is None:
            raise _Unsupported("symbolic shape")
        out: list[np.ndarray | None] = [None] * len(out_shape)
        before_out = np.concatenate([[1], np.cumprod(out_shape, dtype=np.int64)]) if out_shape else np.array([1])
        for a, lab in enumerate(x):
            if in_shape[a] == 1:
                continue
            before = int(np.prod(in_shape[:a], dtype=np.int64))
            after = int(np.prod(in_shape[a + 1:], dtype=np.int64))
            target = None
            for b in range(len(out_shape)):
                if before_out[b] != before or out_shape[b] == 1:
                    continue
                tail = int(np.prod(out_shape[b + 1:], dtype=np.int64))
                if after % tail == 0 and out_shape[b] == in_shape[a] * (after // tail) and out[b] is None:
                    target = (b, after // tail)
                break
            if target is None:
                self.uf.pin(lab, f"{call.op.name} at '{var.name}': {tuple(in_shape)} -> {tuple(out_shape)} splits axis {a}")
                continue
            b, repeat = target
            out[b] = np.repeat(lab, repeat)
        return [lab if lab is not None else self.uf.fresh(n) for lab, n in zip(out, out_shape)]

    def _batch_norm(self, var, call):
        x = self._tensor(call.args[0])
        axis = int(call.attrs.axis) % len(x)
        for arg in call.args[1:5]:
            p = self._tensor(arg)
            if len(p) != 1 or len(p[0]) != len(x[axis]):
                raise _Unsupported("batch_norm statistics do not match the channel axis")
            self.uf.union(x[axis], p[0])
        gamma = call.args[1]
        if isinstance(gamma, self.relax.Var) and gamma in self.param_of:
            self.bn_gammas.append(self.param_of[gamma])
        stats = self._tensor(call.args[3])
        return [list(x), [stats[0]], [self._tensor(call.args[4])[0]]]

    def _pool(self, var, call):
        x = self._tensor(call.args[0])
        layout = str(getattr(call.attrs, "layout", "NCHW"))
        if layout not in ("NCHW", "NCW"):
            raise _Unsupported(f"layout {layout}")
        reason = f"{call.op.name} at '{var.name}': spatial axis"
        for a in range(2, len(x)):
            self.uf.pin(x[a], reason)
        out = self._fresh_for(var.ty, pinned=reason)
        out[0], out[1] = x[0], x[1]
        return out

    def _reduce(self, var, call):
        x = self._tensor(call.args[0])
        axes = call.attrs.axis
        reduced = set(range(len(x))) if axes is None else {int(a) % len(x) for a in axes}
        keepdims = bool(call.attrs.keepdims)
        out = []
        for a, lab in enumerate(x):
            if a in reduced:
                self.uf.pin(lab, f"{call.op.name} at '{var.name}': reduced axis")
                if keepdims:
                    out.append(self.uf.fresh(1))
            else:
                out.append(lab)
        return out

    def _concat(self, var, call):
        parts = self._tensor_tuple(call.args[0])
        rank = len(parts[0])
        axis = int(call.attrs.axis) % rank
        out = []
        for a in range(rank):
            if a == axis:
                out.append(np.concatenate([p[a] for p in parts]))
            else:
                for p in parts[1:]:
                    self.uf.union(parts[0][a], p[a])
                out.append(parts[0][a])
        return out

    def _tensor_tuple(self, expr):
        labels = self.of(expr)
        if not labels or not all(isinstance(item, list) for item in labels):
            raise _Unsupported("concat of an unknown tuple")
        return labels

    def _pad(self, var, call):
        """Unpadded axes keep their labels; a padded axis (spatial, as a rule) is pinned."""
        x = self._tensor(call.args[0])
        widths = [int(w) for w in call.attrs.pad_width]
        out = self._fresh_for(var.ty, pinned=f"relax.nn.pad at '{var.name}': padded axis")
        for a, lab in enumerate(x):
            if widths[2 * a] == 0 and widths[2 * a + 1] == 0:
                out[a] = lab
            else:
                self.uf.pin(lab, f"relax.nn.pad at '{var.name}': padded axis")
        return out

    def _softmax(self, var, call):
        x = self._tensor(call.args[0])
        axis = int(call.attrs.axis) % len(x)
        self.uf.pin(x[axis], f"{call.op.name} at '{var.name}': normalizes over this axis")
        return list(x)


_TIR_BINARY = {"Max": "maximum", "Min": "minimum", "Add": "add", "Sub": "subtract", "Mul": "multiply",
               "Div": "divide"}


def elementwise_call_tir_op(mod, call) -> str | None:
    """The Relax op ("maximum", …) a ``call_tir`` computes when its PrimFunc is a plain
    elementwise binary map (one spatial block, ``out[i…] = op(a[i…], b[i…] or b[()])``), as
    the ONNX frontend emits for Clip; None for anything else."""
    import tvm
    from tvm import relax

    if len(call.args) != 2 or not isinstance(call.args[1], relax.Tuple) or len(call.args[1].fields) != 2:
        return None
    try:
        func = mod[call.args[0]]
    except (KeyError, tvm.TVMError, ValueError, TypeError):
        return None
    stores, blocks = [], []

    def visit(node) -> None:
        """Collect stores and blocks; loops, blocks and sequences are walked, nothing else."""
        if type(node).__name__ in ("BufferStore", "TensorStore"):
            stores.append(node)
        elif type(node).__name__ == "SBlockRealize":
            visit(node.block)
        elif type(node).__name__ == "SBlock":
            blocks.append(node)
            if node.init is not None:
                stores.append(None)  # a reduction: not elementwise
            visit(node.body)
        elif type(node).__name__ == "For":
            visit(node.body)
        elif type(node).__name__ == "SeqStmt":
            for stmt in node.seq:
                visit(stmt)
        else:
            stores.append(None)  # anything else: not a plain map

    visit(func.body)
    if len(stores) != 1 or stores[0] is None:
        return None
    store = stores[0]
    op = _TIR_BINARY.get(type(store.value).__name__)
    if op is None:
        return None
    loads = [store.value.a, store.value.b]
    if not all(type(ld).__name__ in ("BufferLoad", "TensorLoad") for ld in loads):
        return None
    target = [str(i) for i in store.indices]
    if len(set(target)) != len(target) or not all(type(i).__name__ == "Var" for i in store.indices):
        return None
    for ld in loads:
        if len(ld.indices) and [str(i) for i in ld.indices] != target:
            return None
    for block in blocks:
        if any(int(iv.iter_type) != 0 for iv in block.iter_vars):  # 0: data-parallel
            return None
    return op


class _Unsupported(Exception):
    """An op's operands or attributes fall outside its rule; the message says which."""


def analyze_channels(graph: Graph) -> ChannelAnalysis:
    """Channel groups of ``graph``: which layers' output channels are pruned together, which
    channels must stay (and why), and the labels to slice every parameter and constant by."""
    analyzer = _Analyzer(graph)
    analyzer.run()
    uf = analyzer.uf
    roots = uf.roots()
    pinned_classes: dict[int, str] = {}
    for label, reason in uf.pinned.items():
        pinned_classes.setdefault(int(roots[label]), reason)

    # Producers sharing a class belong to one group.
    producers = analyzer.producers
    owner: dict[int, int] = {}
    group_of = list(range(len(producers)))

    def find(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    for i, producer in enumerate(producers):
        for cls in roots[producer.labels].tolist():
            if cls in owner:
                a, b = find(owner[cls]), find(i)
                if a != b:
                    group_of[b] = a
            else:
                owner[cls] = i
    members: dict[int, list[int]] = {}
    for i in range(len(producers)):
        members.setdefault(find(i), []).append(i)
    groups = []
    for idxs in members.values():
        seen: dict[int, None] = {}
        for i in idxs:
            for cls in roots[producers[i].labels].tolist():
                seen.setdefault(cls, None)
        channels = list(seen)
        pinned = {c: pinned_classes[c] for c in channels if c in pinned_classes}
        groups.append(ChannelGroup([producers[i] for i in idxs], channels, pinned))
    for group in groups:
        if group.reason:
            log.info("channel group %s cannot be pruned: %s", group.name, group.reason)
    return ChannelAnalysis(
        groups=groups,
        param_labels=analyzer.param_labels,
        const_labels=analyzer.const_labels,
        var_labels={v: lab for v, lab in analyzer.labels.items() if isinstance(lab, list) and
                    all(isinstance(a, np.ndarray) for a in lab)},
        bn_gammas=analyzer.bn_gammas,
        _parent=roots,
    )

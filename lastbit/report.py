"""What a compiled model costs: parameters, bytes, FLOPs, and a per-layer table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lastbit.graph import Graph

# Relax ops whose work is counted as multiply-accumulates (2 FLOPs each).
_MAC_OPS = ("relax.nn.conv2d", "relax.matmul", "relax.nn.conv1d", "relax.linear")


@dataclass
class LayerInfo:
    """One weighted layer: the op, its weight, its output and its cost."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    kernel: str = "fp32"  # which kernel the target picked for it

    def to_json(self) -> dict:
        d = asdict(self)
        d["weight_shape"], d["output_shape"] = list(self.weight_shape), list(self.output_shape)
        return d


@dataclass
class Report:
    """The numbers ``Artifact.report()`` returns and the CLI prints."""

    model: str
    target: str
    params: int
    model_bytes: int
    flops: int
    layers: list[LayerInfo] = field(default_factory=list)
    latency_ms: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [layer.to_json() for layer in self.layers]
        return d

    def format_table(self) -> str:
        rows = [f"{'layer':<40} {'op':<8} {'weight':<18} {'output':<18} {'MFLOPs':>9}  kernel"]
        for layer in self.layers:
            rows.append(
                f"{layer.name[:40]:<40} {layer.op:<8} {str(layer.weight_shape):<18} "
                f"{str(layer.output_shape):<18} {layer.flops / 1e6:>9.2f}  {layer.kernel}"
            )
        rows.append(
            f"total: {self.params:,} params, {self.model_bytes / 1e6:.2f} MB, {self.flops / 1e9:.3f} GFLOPs"
            + (f", {self.latency_ms:.3f} ms" if self.latency_ms is not None else "")
        )
        return "\n".join(rows)


def layer_table(graph: Graph) -> list[LayerInfo]:
    """Walk ``main`` and cost every conv/matmul whose weight is a parameter of the graph."""
    from tvm import relax

    main = graph.mod["main"]
    param_of = {var: name for var, name in zip(main.params[len(graph.inputs):], graph.params)}
    alias: dict = {}  # var bound to permute_dims/reshape of a parameter -> that parameter
    layers: list[LayerInfo] = []
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
                continue
            op = value.op.name
            if op in ("relax.permute_dims", "relax.reshape", "relax.astype") and value.args[0] in param_of:
                alias[binding.var] = param_of[value.args[0]]
                continue
            if op not in _MAC_OPS:
                continue
            weight = value.args[1]
            pname = param_of.get(weight) or alias.get(weight)
            if pname is None:
                continue
            out_shape = tuple(int(d) for d in binding.var.ty.shape)
            w = graph.params[pname]
            if op == "relax.nn.conv2d":
                groups = int(value.attrs.groups)
                # out elements x (in_channels / groups) x kh x kw MACs
                macs = int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
                kind = "dwconv" if groups > 1 and groups == out_shape[1] else "conv2d"
            else:
                # the reduced dimension is the second-to-last of the right-hand operand
                macs = int(np.prod(out_shape)) * int(weight.ty.shape[-2])
                kind = "dense"
            source = graph.source_names.get(pname, pname)
            layers.append(
                LayerInfo(
                    name=source.removesuffix(".weight"),
                    op=kind,
                    weight_shape=tuple(int(s) for s in w.shape),
                    output_shape=out_shape,
                    params=int(w.size),
                    flops=2 * macs,
                )
            )
    return layers


def build_report(graph: Graph, target: str) -> Report:
    layers = layer_table(graph)
    return Report(
        model=graph.name,
        target=target,
        params=graph.num_params,
        model_bytes=graph.param_bytes,
        flops=int(sum(layer.flops for layer in layers)),
        layers=layers,
    )

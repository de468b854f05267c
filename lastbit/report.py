"""What a compiled model costs: parameters, bytes, FLOPs, and a per-layer table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lastbit.graph import Graph


@dataclass
class LayerInfo:
    """One weighted layer: the op, its weight, its output and its cost."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    kernel: str = "fp32"  # which kernel the target picked for it; "pow2-4 (ref)": dequantize + fp32
    bits: int = 32  # storage bits per weight (the code width when quantized)
    weight_bytes: int = 0  # the weight as stored: packed codes + α, or 4 bytes/param

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
    fp32_bytes: int = 0  # the same parameters at 4 bytes each
    accuracy: float | None = None  # top-1 on the squeeze data, when it has labels

    @property
    def compression(self) -> float:
        """fp32 size over stored size (codes packed)."""
        return self.fp32_bytes / self.model_bytes if self.model_bytes else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [layer.to_json() for layer in self.layers]
        d["compression"] = self.compression
        return d

    def format_table(self) -> str:
        rows = [f"{'layer':<40} {'op':<8} {'weight':<18} {'output':<18} {'MFLOPs':>9} {'bits':>4}  kernel"]
        for layer in self.layers:
            rows.append(
                f"{layer.name[:40]:<40} {layer.op:<8} {str(layer.weight_shape):<18} "
                f"{str(layer.output_shape):<18} {layer.flops / 1e6:>9.2f} {layer.bits:>4}  {layer.kernel}"
            )
        rows.append(
            f"total: {self.params:,} params, {self.model_bytes / 1e6:.2f} MB"
            + (f" ({self.compression:.1f}x smaller than fp32)" if self.model_bytes != self.fp32_bytes else "")
            + f", {self.flops / 1e9:.3f} GFLOPs"
            + (f", {self.latency_ms:.3f} ms" if self.latency_ms is not None else "")
            + (f", accuracy {self.accuracy:.2%}" if self.accuracy is not None else "")
        )
        return "\n".join(rows)


def layer_table(graph: Graph) -> list[LayerInfo]:
    """Cost every conv/matmul whose weight is a parameter of the graph (quantized or not)."""
    from lastbit.passes.quantize_pow2 import weighted_layers

    weight_of_codes = {info.codes_param: weight for weight, info in graph.quant.items()}
    layers: list[LayerInfo] = []
    for layer in weighted_layers(graph):
        pname = weight_of_codes.get(layer.weight, layer.weight)
        quant = graph.quant.get(pname)
        w = graph.params[layer.weight]
        out_shape = tuple(int(d) for d in layer.relax_var.ty.shape)
        if layer.kind in ("conv2d", "conv1d"):
            groups = int(layer.call.attrs.groups)
            # out elements x (in_channels / groups) x kernel window MACs
            macs = int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
            kind = "dwconv" if groups > 1 and groups == out_shape[1] else layer.kind
        else:
            # the reduced dimension is the second-to-last of the right-hand operand
            macs = int(np.prod(out_shape)) * int(layer.call.args[1].ty.shape[-2])
            kind = "dense"
        source = quant.source_name if quant else graph.source_names.get(pname, pname)
        layers.append(
            LayerInfo(
                name=source.removesuffix(".weight"),
                op=kind,
                weight_shape=tuple(int(s) for s in w.shape),
                output_shape=out_shape,
                params=int(w.size),
                flops=2 * macs,
                kernel=f"{quant.code_set} (ref)" if quant else "fp32",
                bits=quant.bits if quant else 8 * w.itemsize,
                weight_bytes=(packed_bytes(w.size, quant.bits) + graph.params[quant.alpha_param].nbytes)
                if quant else int(w.nbytes),
            )
        )
    return layers


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` each, packed densely: ceil(count·bits/8)."""
    return math.ceil(count * bits / 8)


def stored_bytes(graph: Graph) -> tuple[int, int, int]:
    """(parameters, bytes as stored, bytes at fp32): codes count ceil(n·bits/8), their α
    float32 (overhead, not parameters), every other parameter its own size."""
    codes_bits = {info.codes_param: info.bits for info in graph.quant.values()}
    alphas = {info.alpha_param for info in graph.quant.values()}
    params, stored = 0, 0
    for name, value in graph.params.items():
        if name in codes_bits:
            params, stored = params + value.size, stored + packed_bytes(value.size, codes_bits[name])
        elif name in alphas:
            stored += value.nbytes
        else:
            params, stored = params + value.size, stored + value.nbytes
    return int(params), int(stored), 4 * int(params)


def build_report(graph: Graph, target: str) -> Report:
    layers = layer_table(graph)
    params, stored, fp32 = stored_bytes(graph)
    return Report(
        model=graph.name,
        target=target,
        params=params,
        model_bytes=stored,
        flops=int(sum(layer.flops for layer in layers)),
        layers=layers,
        fp32_bytes=fp32,
    )

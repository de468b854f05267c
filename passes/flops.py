"""FLOPs of each conv/dense layer of a Graph, keyed by the layer's source name, so structural
passes can say what they saved and the report can show before/after per layer."""

from __future__ import annotations

import numpy as np

from lastbit.graph import Graph

__all__ = ["layer_flops", "layer_key"]


def layer_key(graph: Graph, weight: str) -> str:
    """The name a layer is reported under: its weight's source name without ``.weight``."""
    info = graph.quant.get(weight)
    source = info.source_name if info else graph.source_names.get(weight, weight)
    return source.removesuffix(".weight")


def layer_flops(graph: Graph) -> dict[str, int]:
    """2·MACs of every conv/dense layer whose weight is a parameter (a layer split in two by
    low-rank keeps one entry per half, named ``<layer>:svd0`` / ``<layer>:svd1``)."""
    from lastbit.passes.quantize_pow2 import weighted_layers

    weight_of_codes = {info.codes_param: weight for weight, info in graph.quant.items()}
    flops: dict[str, int] = {}
    for layer in weighted_layers(graph):
        w = graph.params[layer.weight]
        out_shape = [int(d) for d in layer.relax_var.ty.shape]
        if layer.kind in ("conv2d", "conv1d"):
            macs = int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
        else:
            macs = int(np.prod(out_shape)) * int(layer.call.args[1].ty.shape[-2])
        key = layer_key(graph, weight_of_codes.get(layer.weight, layer.weight))
        flops[key] = flops.get(key, 0) + 2 * macs
    return flops

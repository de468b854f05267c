"""The data-dependent squeeze step: ADMM (or STE) fine-tuning of the source torch module, its
weights written back into the Graph (``lastbit.pipeline.squeeze_passes`` orders it).

Both trainers leave every quantized weight at exactly α·codes, so the ``QuantizePow2`` pass that
follows recovers the codes without rounding anything (``QuantInfo.exact``).
"""

from __future__ import annotations

import logging

import numpy as np

from lastbit.graph import Graph
from lastbit.passes.pow2_projection import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["AdmmFinetune"]


class AdmmFinetune:
    """Graph -> Graph: fine-tune the torch module the graph was imported from with ADMM
    (``lastbit.passes.admm.admm_finetune``), or with ``mode="ste"`` straight through
    (``ste_finetune``), on ``squeeze.data`` and write the weights back through
    ``Graph.source_names``.

    The layers the graph keeps off the low-bit codes (``keep_first_last``) are skipped by
    name and stored on ``first_last_codes`` (int8) as the graph stores them, so ADMM and the
    graph agree on every layer. BatchNorm statistics that ADMM
    re-estimates are buffers the importer bound as constants; when they changed, the module
    is re-exported so the graph carries them (this needs the graph's parameters to still be
    the imported ones). The fine-tuned module is kept in ``self.result`` (an AdmmResult).
    """

    def __init__(self, squeeze, torch_module):
        self.squeeze = squeeze
        self.torch_module = torch_module
        self.result = None

    @property
    def mode(self) -> str:
        """The trainer this pass runs, "admm" or "ste" (``Squeeze.trainer``)."""
        return self.squeeze.trainer

    def __call__(self, graph: Graph) -> Graph:
        from lastbit.passes.admm import quantizable_layers
        from lastbit.passes.quantize_pow2 import weighted_layers

        if graph.source != "torch":
            raise QuantizationError(f"{self.mode.upper()} fine-tuning needs a graph imported from torch, "
                                    f"'{graph.name}' came from {graph.source}")
        sq = self.squeeze
        skip: list[str] = []
        layers = weighted_layers(graph)
        if sq.keep_first_last and layers:
            torch_layers, _ = quantizable_layers(self.torch_module, skip=None)
            for weight in {layers[0].weight, layers[-1].weight}:
                module_name = graph.source_names.get(weight, weight).removesuffix(".weight")
                if module_name in torch_layers:
                    skip.append(module_name)
        layer_codes = self._layer_codes(graph)
        codes = sq.code_set if sq.global_quantizes else "int8"  # without a global set every layer is named
        log.info("%s fine-tuning %s onto %s (%d epochs), keeping %s off it%s", self.mode.upper(), graph.name,
                 sq.code_set.name if sq.global_quantizes else "per-layer code sets", sq.epochs, skip,
                 f", {len(layer_codes)} layer(s) on their own code set" if layer_codes else "")
        before = {n: b.detach().clone() for n, b in self.torch_module.named_buffers()}
        self.result = sq.finetune_function()(
            self.torch_module, sq.data, codes, per_channel=sq.per_channel, skip=skip,
            skip_codes=sq.first_last_codes, layer_codes=layer_codes, **sq.admm_kwargs()
        )
        return self._write_back(graph, before)

    def _layer_codes(self, graph: Graph) -> dict:
        """{torch module: code set or "fp32"} for Squeeze.layers; without a global code set, the
        layers it does not name stay float32 (as QuantizePow2 leaves them)."""
        from lastbit.passes.admm import quantizable_layers
        from lastbit.passes.flops import layer_key
        from lastbit.passes.quantize_pow2 import weighted_layers

        sq = self.squeeze
        if sq.layers is None:
            return {}
        torch_layers = set(sum(quantizable_layers(self.torch_module, skip=None), []))
        codes = {}
        for layer in weighted_layers(graph):
            module_name = graph.source_names.get(layer.weight, layer.weight).removesuffix(".weight")
            if module_name not in torch_layers:
                continue
            choice = sq.layers.get(layer_key(graph, layer.weight))
            if choice is not None:
                codes[module_name] = choice.codes
            elif not sq.global_quantizes:
                codes[module_name] = "fp32"
        return codes

    def _write_back(self, graph: Graph, buffers_before: dict) -> Graph:
        module = self.result.module
        state = module.state_dict()
        params, written = dict(graph.params), 0
        for name, old in graph.params.items():
            source = graph.source_names.get(name)
            if source not in state:
                continue
            new = state[source].detach().cpu().numpy()
            if new.shape != old.shape:
                raise QuantizationError(f"fine-tuned '{source}' has shape {new.shape}, the graph's '{name}' {old.shape}")
            params[name] = np.ascontiguousarray(new.astype(old.dtype))
            written += 1
        if written == 0:
            raise QuantizationError(f"no parameter of '{graph.name}' maps to the torch module (source_names)")
        changed = [
            n for n, b in module.named_buffers()
            if b.is_floating_point() and n in buffers_before and not np.array_equal(b.cpu().numpy(), buffers_before[n].cpu().numpy())
        ]
        if not changed:
            return graph.replace(params=params)
        fresh = _reimport(module, graph)
        same_signature = list(fresh.params) == list(graph.params) and all(
            fresh.params[n].shape == graph.params[n].shape for n in graph.params
        )
        if not same_signature:
            log.warning("buffers %s changed in fine-tuning but the graph no longer matches the module; "
                        "they keep their imported values", changed)
            return graph.replace(params=params)
        return graph.replace(mod=fresh.mod, params=fresh.params)


def _reimport(module, graph: Graph) -> Graph:
    import torch

    from lastbit.frontend import from_torch

    examples = tuple(torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)) for spec in graph.inputs)
    return from_torch(module, examples, name=graph.name)

"""Fine-tuning after channel pruning: the torch module the graph came from is shrunk to the
pruned shapes through ``source_names`` (weights sliced with the same channel indices, the
batch-norm statistics and the layer attributes — channels, groups, features — to match),
trained for a few epochs, and re-imported, so the graph gets the recovered weights.

It needs a module whose forward works at any channel count: a module that hard-codes a
size (``x.view(-1, 400)``) fails the check forward pass and the error says so.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from lastbit.graph import Graph
from lastbit.passes.channel_groups import ChannelAnalysis
from lastbit.passes.prune_channels import PruneError

log = logging.getLogger(__name__)

__all__ = ["finetune", "finetune_pruned", "shrink_module"]


def shrink_module(module, graph: Graph, analysis: ChannelAnalysis, removed: set[int]):
    """A copy of ``module`` with the channels in ``removed`` cut out of every parameter that
    ``graph`` maps to it, its BatchNorm statistics, and its layer attributes."""
    import torch

    shrunk = copy.deepcopy(module)
    named = dict(shrunk.named_parameters())
    kept_out: dict[str, np.ndarray] = {}  # module path -> kept indices of its axis 0
    with torch.no_grad():
        for name, labels_per_axis in analysis.param_labels.items():
            source = graph.source_names.get(name)
            if source not in named:
                continue
            p = named[source]
            value = p.detach()
            for axis, labels in enumerate(labels_per_axis):
                keep = analysis.keep_indices(labels, removed)
                if len(keep) < value.shape[axis]:
                    value = value.index_select(axis, torch.as_tensor(keep))
                if axis == 0:
                    kept_out[source.rsplit(".", 1)[0]] = keep
            p.data = value.contiguous()
        for path, m in shrunk.named_modules():
            _fix_attributes(m, kept_out.get(path))
    return shrunk


def _fix_attributes(m, kept: np.ndarray | None) -> None:
    """Layer attributes and BN buffers that must follow the new weight shapes."""
    import torch
    from torch import nn

    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if kept is not None and m.running_mean is not None and len(kept) < m.running_mean.shape[0]:
            index = torch.as_tensor(kept)
            m.running_mean = m.running_mean.index_select(0, index)
            m.running_var = m.running_var.index_select(0, index)
        if m.weight is not None:
            m.num_features = m.weight.shape[0]
    elif isinstance(m, nn.modules.conv._ConvNd):
        was_depthwise = m.groups > 1 and m.groups == m.in_channels and m.weight.shape[1] == 1
        m.out_channels = m.weight.shape[0]
        if was_depthwise:
            m.groups = m.in_channels = m.out_channels
        else:
            m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape


def _batches(data: Any, batch_size: int, seed: int):
    """(x, y) tensors from (X, y) arrays (shuffled) or an iterable of batches."""
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        x = torch.as_tensor(np.asarray(data[0], dtype=np.float32))
        y = torch.as_tensor(np.asarray(data[1])).long()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
        return
    for xb, yb in data:
        yield torch.as_tensor(np.asarray(xb, dtype=np.float32)), torch.as_tensor(np.asarray(yb)).long()


def finetune(module, data: Any, epochs: int, lr: float = 0.01, batch_size: int = 64, progress: bool = True,
             seed: int = 0) -> list[float]:
    """Train ``module`` with momentum SGD on cross-entropy; returns the mean loss of each epoch."""
    import torch
    from tqdm.auto import tqdm

    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    losses = []
    module.train()
    with torch.random.fork_rng(devices=[]), tqdm(total=epochs, disable=not progress, desc="prune fine-tune",
                                                 leave=False) as bar:
        torch.manual_seed(seed)
        for epoch in range(epochs):
            total, count = 0.0, 0
            for xb, yb in _batches(data, batch_size, seed + epoch):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(module(xb), yb)
                if not torch.isfinite(loss):
                    raise PruneError(f"fine-tuning after pruning diverged in epoch {epoch} (loss {loss.item()}); lower lr")
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(yb), count + len(yb)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    module.eval()
    return losses


def finetune_pruned(module, original: Graph, pruned: Graph, analysis: ChannelAnalysis, removed: set[int],
                    data: Any, epochs: int, lr: float, batch_size: int) -> tuple[Graph, Any]:
    """Shrink ``module`` like ``pruned``, fine-tune it, re-import it: (graph, trained module)."""
    import torch

    from lastbit.frontend import from_torch

    if original.source != "torch":
        raise PruneError(f"fine-tuning after pruning needs a graph imported from torch, '{original.name}' came "
                         f"from {original.source}")
    shrunk = shrink_module(module, original, analysis, removed)
    examples = tuple(torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)) for spec in original.inputs)
    try:
        with torch.no_grad():
            shrunk.eval()(*examples)
    except RuntimeError as err:
        raise PruneError(f"the pruned {type(module).__name__} does not run in torch, so it cannot be fine-tuned "
                         f"(a size fixed in its forward?): {err}") from err
    losses = finetune(shrunk, data, epochs, lr=lr, batch_size=batch_size)
    log.info("fine-tuned the pruned %s for %d epochs: loss %.4f -> %.4f", original.name, epochs, losses[0], losses[-1])
    fresh = from_torch(shrunk, examples, name=original.name)
    mismatch = [n for n in pruned.params if n not in fresh.params or fresh.params[n].shape != pruned.params[n].shape]
    if mismatch or len(fresh.params) != len(pruned.params):
        raise PruneError(f"the fine-tuned module re-imports with other parameters than the pruned graph: {mismatch[:4]}")
    return fresh.replace(layer_flops_before=pruned.layer_flops_before, quant=pruned.quant), shrunk

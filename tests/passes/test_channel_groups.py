"""Channel dependency analysis: which layers' channels are tied, on torch and ONNX imports."""

import io

import numpy as np
import pytest
import torch
from prune_models import (
    ConcatNet,
    DepthwiseNet,
    FlattenNet,
    GroupedNet,
    ResidualNet,
    randomize,
)

from lastbit.frontend import from_onnx, from_torch
from lastbit.passes.channel_groups import analyze_channels


def _import(model, source, shape=(1, 3, 8, 8)):
    x = torch.randn(*shape)
    if source == "torch":
        return from_torch(model, (x,))
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    return from_onnx(onnx.load_from_string(buf.getvalue()), name=type(model).__name__)


def _groups(graph):
    """{frozenset of producer source names: group}."""
    analysis = analyze_channels(graph)
    named = {}
    for g in analysis.groups:
        key = frozenset(graph.source_names.get(p.weight, p.weight) for p in g.producers)
        named[key] = g
    return analysis, named


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_residual_add_ties_block_outputs_to_stem(source):
    graph = _import(randomize(ResidualNet()), source)
    _, groups = _groups(graph)
    keys = [sorted(k) for k in groups]
    # stem and c2 are added together; d2 and the 1x1 shortcut too; c1 and d1 stand alone.
    tied = [k for k in keys if len(k) == 2]
    assert len(tied) == 2, keys
    assert sorted(len(g.channels) for g in groups.values()) == [5, 8, 8, 12, 12]
    alone = [k for k in keys if len(k) == 1]
    assert len(alone) == 3  # c1, d1, fc (fc: model output, pinned)
    fc = next(g for k, g in groups.items() if any("fc" in n for n in k))
    assert fc.reason == "model output"


def test_batch_norm_params_and_constants_follow_their_conv():
    graph = _import(randomize(ResidualNet()), "torch")
    analysis, groups = _groups(graph)
    stem = next(g for k, g in groups.items() if "stem.weight" in k)
    channels = set(stem.channels)
    for bn in ("p_bn0_weight", "p_bn0_bias", "p_bn2_weight"):
        assert set(analysis.find(analysis.param_labels[bn][0]).tolist()) <= channels
    # running mean/var are constants in the torch import: they are tied too
    tied_consts = [c for c, axes in analysis.const_labels if len(axes) == 1 and
                   set(analysis.find(axes[0]).tolist()) <= channels]
    assert len(tied_consts) >= 4  # bn0 and bn2: mean and var each


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_depthwise_follows_expand(source):
    graph = _import(randomize(DepthwiseNet()), source)
    analysis, groups = _groups(graph)
    expand = next(g for k, g in groups.items() if any("expand" in n for n in k) or
                  (len(g.channels) == 16))
    assert len(expand.channels) == 16 and not expand.reason
    dw = next(n for n in graph.params if graph.params[n].shape == (16, 1, 3, 3))
    assert set(analysis.find(analysis.param_labels[dw][0]).tolist()) == set(expand.channels)


def test_concat_gives_each_branch_its_slice():
    graph = _import(randomize(ConcatNet()), "torch")
    analysis, groups = _groups(graph)
    a, b = groups[frozenset({"a.weight"})], groups[frozenset({"b.weight"})]
    assert len(a.channels) == 6 and len(b.channels) == 10
    c_in = analysis.find(analysis.param_labels["p_c_weight"][1]).tolist()
    assert c_in[:6] == a.channels and c_in[6:] == b.channels


def test_flatten_into_dense_repeats_each_channel():
    graph = _import(FlattenNet().eval(), "torch")
    analysis, groups = _groups(graph)
    conv = groups[frozenset({"conv.weight"})]
    fc1_in = analysis.find(analysis.param_labels["p_fc1_weight"][1])
    assert len(fc1_in) == 8 * 16
    assert fc1_in.tolist() == np.repeat(conv.channels, 16).tolist()
    assert not groups[frozenset({"fc1.weight"})].reason


def test_unprunable_nodes_name_the_reason():
    graph = _import(GroupedNet().eval(), "torch")
    _, groups = _groups(graph)
    c1 = groups[frozenset({"c1.weight"})]
    assert "grouped conv (groups=2" in c1.reason
    c2 = groups[frozenset({"c2.weight"})]
    assert "relax.flip" in c2.reason and "not modelled" in c2.reason
    assert not groups[frozenset({"c3.weight"})].reason  # after the flip: free again


class PadNet(torch.nn.Module):
    """Spatial padding keeps channels prunable; padding the channel axis pins them."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3)
        self.b = torch.nn.Conv2d(8, 8, 3)
        self.c = torch.nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = self.b(torch.nn.functional.pad(torch.relu(self.a(x)), (1, 1, 1, 1)))
        y = torch.nn.functional.pad(y, (0, 0, 0, 0, 1, 1))  # 8 -> 10 channels
        return self.c(y).mean(dim=(2, 3))


def test_pad_rule():
    graph = _import(PadNet().eval(), "torch")
    _, groups = _groups(graph)
    assert not groups[frozenset({"a.weight"})].reason
    assert "relax.nn.pad" in groups[frozenset({"b.weight"})].reason

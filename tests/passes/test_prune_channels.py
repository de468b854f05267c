"""Channel pruning: removing zeroed channels leaves outputs unchanged, on torch and ONNX
imports of residual, depthwise, concat and flatten->dense nets; criteria; targets."""

import io

import numpy as np
import pytest
import torch
from graph_runner import run_graph, zero_channels
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
from lastbit.passes.flops import layer_flops
from lastbit.passes.prune_channels import (
    PruneChannels,
    PruneError,
    channel_scores,
    choose_channels,
    l1_filter_scores,
    parse_prune_target,
    prune_channels,
    taylor_scores,
)

MODELS = {"residual": ResidualNet, "depthwise": DepthwiseNet, "concat": ConcatNet, "flatten": FlattenNet,
          "grouped": GroupedNet}


def _import(model, source, x):
    if source == "torch":
        return from_torch(model, (x,))
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    return from_onnx(onnx.load_from_string(buf.getvalue()), name=type(model).__name__)


@pytest.mark.parametrize("source", ["torch", "onnx"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruning_zeroed_channels_keeps_outputs(name, source):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    graph = _import(randomize(MODELS[name]()), source, x)
    analysis = analyze_channels(graph)
    rng = np.random.default_rng(1)
    removed = set()
    for group in analysis.groups:  # a random half of every prunable group
        free = group.prunable
        if free:
            k = min(len(free), len(group.channels) - 1, max(1, len(group.channels) // 2))
            removed.update(rng.choice(free, size=k, replace=False).tolist())
    assert removed, "every test model has a prunable group"
    zeroed = zero_channels(graph, analysis, removed)
    pruned = prune_channels(zeroed, analysis, removed)
    assert pruned.num_params < graph.num_params
    assert sum(layer_flops(pruned).values()) < sum(layer_flops(graph).values())
    expected = run_graph(zeroed, x.numpy())
    np.testing.assert_allclose(run_graph(pruned, x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_pruned_shapes_on_residual_net():
    graph = from_torch(randomize(ResidualNet()), (torch.randn(1, 3, 8, 8),))
    pruned = PruneChannels(0.5, round_to=1)(graph)
    p = pruned.params
    assert p["p_stem_weight"].shape == (4, 3, 3, 3)
    assert p["p_c1_weight"].shape == (4, 4, 3, 3)
    assert p["p_c2_weight"].shape == (4, 4, 3, 3)  # tied to the stem by the residual add
    assert p["p_bn2_weight"].shape == (4,)
    assert p["p_d1_weight"].shape == (6, 4, 3, 3) and p["p_short_weight"].shape == (6, 4, 1, 1)
    assert p["p_fc_weight"].shape == (5, 6)  # reads the pruned channels; its outputs stay
    assert pruned.layer_flops_before["stem"] == layer_flops(graph)["stem"]
    # runs, and the output keeps its shape
    assert run_graph(pruned, np.ones((1, 3, 8, 8), "float32")).shape == (1, 5)


def test_unprunable_groups_are_skipped_with_reason(caplog):
    graph = from_torch(GroupedNet().eval(), (torch.randn(1, 3, 8, 8),))
    prune = PruneChannels(0.5, round_to=1)
    with caplog.at_level("INFO"):
        pruned = prune(graph)
    reasons = dict(prune.skipped)
    assert any("grouped conv" in r for r in reasons.values())
    assert any("relax.flip" in r for r in reasons.values())
    assert "grouped conv" in caplog.text
    assert pruned.params["p_c1_weight"].shape == graph.params["p_c1_weight"].shape
    assert pruned.params["p_c3_weight"].shape == (3, 6, 1, 1)  # after the flip: pruned


def test_l1_scores_and_bn_criterion_pick_the_weak_channels():
    w = np.ones((4, 2, 3, 3), np.float32)
    w[2] *= 0.01
    assert l1_filter_scores(w, 0).argmin() == 2
    model = randomize(ResidualNet())
    with torch.no_grad():
        model.bn1.weight[[1, 5]] = 1e-4  # c1's BN γ: network slimming removes these
    graph = from_torch(model, (torch.randn(1, 3, 8, 8),))
    analysis = analyze_channels(graph)
    c1 = next(g for g in analysis.groups if g.producers[0].weight == "p_c1_weight")
    scores = channel_scores(graph, analysis, c1, "bn")
    assert set(np.argsort(scores)[:2].tolist()) == {1, 5}
    removed = choose_channels(graph, analysis, parse_prune_target({"c1": 0.25}), "bn")
    assert removed == {c1.channels[1], c1.channels[5]}


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 4)
        self.fc2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_taylor_keeps_a_small_weight_with_a_large_gradient(one_thread):
    """Seed 000's point: hidden unit 0 has the smallest weights (L1 removes it) but the loss
    depends on it strongly (its outgoing weights are large): Taylor keeps it."""
    torch.manual_seed(0)
    model = TinyMLP()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    with torch.no_grad():
        model.fc1.weight.normal_(0, 1.0)
        model.fc1.bias.zero_()
        model.fc1.weight[0] *= 0.05  # small weights ...
        model.fc2.weight.normal_(0, 0.1)
        model.fc2.weight[:, 0] = torch.tensor([40.0, -40.0, 0.0])  # ... that drive the output
        h = torch.relu(model.fc1(torch.from_numpy(x)))
    y = (h[:, 0] * 40 > h[:, 1:].sum(1) * 0.1).long().numpy()  # labels that depend on unit 0
    graph = from_torch(model, (torch.from_numpy(x[:1]),))
    l1 = PruneChannels(0.25, "l1", round_to=1)(graph)
    taylor = PruneChannels(0.25, "taylor", torch_module=model, data=(x, y), round_to=1)(graph)
    w = graph.params["p_fc1_weight"]
    assert not any(np.array_equal(row, w[0]) for row in l1.params["p_fc1_weight"])
    assert any(np.array_equal(row, w[0]) for row in taylor.params["p_fc1_weight"])


def test_taylor_scores_square_the_batch_contributions():
    c = np.array([[1.0, -2.0], [3.0, 0.0]])
    np.testing.assert_allclose(taylor_scores(c), [5.0, 2.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flop_target_removes_about_that_share(seed):
    torch.manual_seed(seed)
    graph = from_torch(randomize(ResidualNet(), seed), (torch.randn(1, 3, 16, 16),))
    before = sum(layer_flops(graph).values())
    exact = sum(layer_flops(PruneChannels("flops:0.5", round_to=1)(graph)).values())
    assert 0.4 * before < exact <= 0.6 * before  # the per-channel estimate ignores in×out overlap
    aligned = sum(layer_flops(PruneChannels("flops:0.5")(graph)).values())
    assert aligned <= 0.6 * before  # whole channel blocks: rounded towards pruning more


def test_bad_settings_name_the_value():
    with pytest.raises(PruneError, match="1.5"):
        parse_prune_target(1.5)
    with pytest.raises(PruneError, match="flops"):
        parse_prune_target("flops:0")
    with pytest.raises(PruneError, match="magic"):
        PruneChannels(0.5, "magic")
    graph = from_torch(randomize(ResidualNet()), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PruneError, match="nosuchlayer"):
        PruneChannels({"nosuchlayer": 0.5})(graph)
    with pytest.raises(PruneError, match="taylor"):
        PruneChannels(0.5, "taylor")(graph)


def test_kept_channels_stay_whole_simd_blocks():
    from lastbit.passes.prune_channels import aligned_removal

    assert aligned_removal(64, 0.3 * 64, 63, 8) == 16  # 44.8 kept -> 48
    assert aligned_removal(16, 0.3 * 16, 15, 8) == 8  # 11.2 kept -> 8
    assert aligned_removal(16, 0.1 * 16, 15, 8) == 0  # 14.4 kept -> 16
    assert aligned_removal(12, 0.5 * 12, 11, 8) == 4  # blocks of 4: 6 kept -> 8
    assert aligned_removal(12, 0.5 * 12, 11, 1) == 6  # round_to 1: exact
    assert aligned_removal(10, 0.5 * 10, 9, 8) == 4  # blocks of 2: 5 kept -> 6
    assert aligned_removal(7, 0.5 * 7, 6, 8) == 3  # odd: exact
    assert aligned_removal(64, 0.5 * 64, 10, 8) == 10  # pinned channels cap it
    assert aligned_removal(64, 0.99 * 64, 63, 8) == 56  # at least one block stays


def test_finetune_after_pruning_recovers_and_writes_back(one_thread):
    from lastbit.passes.prune_finetune import shrink_module

    torch.manual_seed(0)
    model = randomize(DepthwiseNet())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()  # labels the unpruned model gets right
    graph = from_torch(model, (torch.from_numpy(x[:1]),))
    prune = PruneChannels(0.5, torch_module=model, data=(x, y), batch_size=32, finetune_epochs=4, lr=0.02,
                          round_to=1)
    tuned = prune(graph)
    shrunk = prune.finetuned
    assert shrunk.dw.groups == shrunk.dw.out_channels == 8 and shrunk.bn_d.running_mean.shape == (8,)
    assert model.dw.groups == 16  # the caller's module is untouched
    # the graph carries the fine-tuned weights: it computes what the shrunk module computes
    with torch.no_grad():
        np.testing.assert_allclose(run_graph(tuned, x[:1]), shrunk(torch.from_numpy(x[:1])).numpy(),
                                   rtol=1e-4, atol=1e-5)
    # and training helped: lower loss than the same pruned model before fine-tuning
    analysis = analyze_channels(graph)
    removed = choose_channels(graph, analysis, parse_prune_target(0.5), "l1")
    untrained = shrink_module(model, graph, analysis, removed).eval()
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        assert loss(shrunk(xt), yt) < loss(untrained(xt), yt)


def test_zoo_resnet20_pruned_exactly_where_channels_are_zero():
    from lastbit.frontend.models import get_model

    model, example = get_model("resnet20", pretrained=False)
    graph = from_torch(model, (example,))
    analysis = analyze_channels(graph)
    removed = choose_channels(graph, analysis, parse_prune_target(0.5), "l1", round_to=8)
    zeroed = zero_channels(graph, analysis, removed)
    pruned = prune_channels(zeroed, analysis, removed)
    assert sum(layer_flops(pruned).values()) < 0.3 * sum(layer_flops(graph).values())
    x = example.numpy()
    np.testing.assert_allclose(run_graph(pruned, x), run_graph(zeroed, x), rtol=1e-4, atol=1e-5)


def test_per_layer_ratios_of_a_residual_group_agree_or_fail():
    """stem and c2 produce one group: one of them asking prunes it all (the other follows);
    two different ratios are one PruneError naming the group."""
    graph = from_torch(randomize(ResidualNet()), (torch.randn(1, 3, 8, 8),))
    analysis = analyze_channels(graph)
    group = next(g for g in analysis.groups if len(g.producers) == 2 and g.producers[0].weight == "p_stem_weight")
    removed = choose_channels(graph, analysis, parse_prune_target({"stem": 0.5}), "l1")
    assert len(removed & set(group.channels)) == 4
    assert removed == choose_channels(graph, analysis, parse_prune_target({"stem": 0.5, "c2": 0.5}), "l1")
    with pytest.raises(PruneError, match=r"channel group stem\+c2 .*stem keep 0.5, c2 keep 0.75"):
        choose_channels(graph, analysis, parse_prune_target({"stem": 0.5, "c2": 0.25}), "l1")

"""Per-layer squeeze configuration: JSON round trip, clear errors, and Squeeze(layers=...)
compiling a model with mixed code sets bit-exactly against the numpy integer reference."""

import json

import numpy as np
import pytest

import lastbit
from lastbit.layer_config import LayerChoice, LayerConfig, LayerConfigError, parse_layers
from lastbit.passes.prune_channels import PruneError
from lastbit.squeeze import Squeeze
from tests.codegen.test_quant_lowering import _numpy_small_cnn

HOST = "x86_64-linux-gnu"


def test_config_round_trips_through_json(tmp_path):
    config = LayerConfig({"layer1.0.conv1": LayerChoice("ternary", keep=0.75), "fc": LayerChoice("int8", rank=8),
                          "conv1": LayerChoice("fp32")})
    path = tmp_path / "config.json"
    config.to_json(path)
    assert LayerConfig.from_json(path) == config
    assert LayerConfig.from_json(path.read_text()) == config
    assert list(LayerConfig.from_json(path).layers) == ["layer1.0.conv1", "fc", "conv1"]  # order kept
    assert json.loads(path.read_text())["layers"]["fc"] == {"codes": "int8", "keep": 1.0, "rank": 8}
    # the short forms users write by hand
    short = parse_layers({"fc": "binary", "conv1": {"codes": "pow2-2", "keep": 0.5}})
    assert short["fc"] == LayerChoice("binary") and short["conv1"] == LayerChoice("pow2-2", keep=0.5)
    assert config.prune_ratios == {"layer1.0.conv1": 0.25} and config.ranks == {"fc": 8}


@pytest.mark.parametrize("choice, message", [
    ({"codes": "pow2-3"}, "unknown code set 'pow2-3'"),
    ({"keep": 0.0}, "keep ratio must be in (0, 1], got 0.0"),
    ({"keep": 1.5}, "keep ratio must be in (0, 1], got 1.5"),
    ({"rank": 0}, "rank must be an int ≥ 1 or None, got 0"),
    ({"rank": 2.5}, "rank must be an int ≥ 1 or None, got 2.5"),
    ({"bits": 3}, "unknown field(s) 'bits'"),
])
def test_a_bad_choice_is_one_error_naming_the_layer_and_value(choice, message):
    with pytest.raises(LayerConfigError) as err:
        LayerConfig({"layer2.0.conv1": choice})
    assert "layer2.0.conv1" in str(err.value) and message in str(err.value)


def test_bad_files_and_conflicts_are_clear(tmp_path):
    with pytest.raises(LayerConfigError, match="does not exist"):
        Squeeze(layers=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayerConfigError, match="bad.json: not valid JSON"):
        Squeeze(layers=bad)
    with pytest.raises(PruneError, match="either per layer"):
        Squeeze(prune=0.5, layers={"conv1": LayerChoice(keep=0.5)})


def test_an_unknown_layer_fails_before_any_pass_naming_it(small_cnn):
    model, x = small_cnn
    with pytest.raises(LayerConfigError) as err:
        lastbit.compile(model, HOST, (x,), squeeze=Squeeze(layers={"conv9": "ternary"}))
    assert "'conv9'" in str(err.value) and "conv1, conv2, fc" in str(err.value)


def test_mixed_code_sets_compile_bit_exactly_against_the_integer_reference(small_cnn):
    model, x = small_cnn
    calib = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype("float32")
    layers = {"conv1": LayerChoice("ternary"), "conv2": LayerChoice("binary"), "fc": LayerChoice("int8")}
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(layers=layers, data=calib))
    got = {i.source_name.removesuffix(".weight"): (i.code_set, i.bits) for i in art.graph.quant.values()}
    assert got == {"conv1": ("ternary", 2), "conv2": ("binary", 1), "fc": ("int8", 8)}
    np.testing.assert_array_equal(art.run(x), _numpy_small_cnn(model, art.graph, x.numpy()))
    table = art.report().format_table()
    assert "per-layer squeeze (3 layer(s))" in table and "conv2                            binary" in table


def test_named_layers_override_the_global_set_and_fp32_stays_float(small_cnn):
    model, x = small_cnn
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3, layers={"conv2": "fp32", "conv1": "pow2-2"}))
    got = {i.source_name.removesuffix(".weight"): i.code_set for i in art.graph.quant.values()}
    assert got == {"conv1": "pow2-2", "fc": "int8"}  # conv2 float; fc is the kept last layer


def test_per_layer_keep_and_rank_reach_the_structural_passes(small_cnn):
    model, x = small_cnn
    layers = {"conv1": LayerChoice("int8", keep=0.5), "conv2": LayerChoice("int8", rank=4)}
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(layers=layers, keep_first_last=False))
    shapes = {layer.name: layer.weight_shape for layer in art.report().layers}
    assert shapes["conv2.svd0"][0] == 4 and shapes["conv2.svd1"][1] == 4  # split at rank 4
    assert shapes["conv1"][0] < 8  # conv1's channel group pruned (conv1 feeds a residual add with conv2)


def test_keeps_of_one_residual_group_must_agree_before_any_pass(small_cnn):
    """conv1 and conv2 produce one channel group (a residual add): it is pruned once, so two
    different keeps for it are one error naming the group and both asks."""
    model, x = small_cnn
    layers = {"conv1": LayerChoice("int8", keep=0.5), "conv2": LayerChoice("int8", keep=0.75)}
    with pytest.raises(LayerConfigError, match=r"channel group conv1\+conv2 .*conv1 keep 0.5, conv2 keep 0.75"):
        lastbit.compile(model, HOST, (x,), squeeze=Squeeze(layers=layers))
    same = {"conv1": LayerChoice("int8", keep=0.5), "conv2": LayerChoice("int8", keep=0.5)}
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(layers=same, keep_first_last=False))
    shapes = {layer.name: layer.weight_shape for layer in art.report().layers}
    assert shapes["conv1"][0] == shapes["conv2"][0] == 4

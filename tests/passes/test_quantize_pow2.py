"""Power-of-two quantization as a graph rewrite: codes + α parameters, the reference lowering
against torch/onnxruntime with projected weights, the report's byte arithmetic, fake-quantized
activations, the ADMM path, and the errors users can act on."""

import copy
import logging
import math

import numpy as np
import pytest
import torch

import lastbit
from lastbit import QuantizationError, Squeeze
from lastbit.frontend import from_torch
from lastbit.graph import Graph, TensorSpec
from lastbit.passes.pow2_projection import code_set, dequantize, project_pow2
from lastbit.passes.quantize_pow2 import QuantizePow2, fake_quant_int8, find_quantized_layers
from lastbit.pipeline import squeeze_passes
from lastbit.report import packed_bytes
from tests.conftest import SmallCNN, SmallMLP, _randomize_bn, assert_close

HOST = "x86_64-linux-gnu"
CNN_LAYERS = ("conv1", "conv2", "fc")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("float32"))
    return model, x


@pytest.fixture(scope="module")
def cnn_graph(cnn):
    model, x = cnn
    return from_torch(model, (x,))


def projected_copy(model, layers, codes, per_channel=True, input_scales=None):
    """The torch model with each named layer's weight replaced by α·q (the test's own projection);
    input_scales (layer -> scale or None) also fake-quantizes those layers' inputs."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in layers:
            layer = getattr(ref, name)
            q, alpha = project_pow2(layer.weight.numpy(), codes, axis=0 if per_channel else None)
            layer.weight.copy_(torch.from_numpy(dequantize(q, alpha)))
            if input_scales is not None:
                scale = input_scales[name]
                layer.register_forward_pre_hook(
                    lambda _m, args, s=scale: (torch.from_numpy(fake_quant_int8(args[0].numpy(), s)),)
                )
    return ref


def check_codes(graph, codes):
    levels = set(code_set(codes).levels.tolist())
    for info in graph.quant.values():
        q = graph.params[info.codes_param]
        assert q.dtype == np.int8 and set(np.unique(q).tolist()) <= levels
        assert graph.params[info.alpha_param].dtype == np.float32
        assert graph.params[info.alpha_param].shape == info.alpha_shape


# --- the reference lowering against torch -----------------------------------------------------


@pytest.fixture(scope="module")
def cnn_per_channel(cnn):
    model, x = cnn
    return lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3, keep_first_last=False, integer_kernels=False))


def test_per_channel_cnn_matches_torch_with_projected_weights(cnn, cnn_per_channel):
    model, x = cnn
    art = cnn_per_channel
    assert {info.source_name for info in art.graph.quant.values()} == {f"{n}.weight" for n in CNN_LAYERS}
    check_codes(art.graph, 3)
    conv2 = next(i for i in art.graph.quant.values() if i.source_name == "conv2.weight")
    fc = next(i for i in art.graph.quant.values() if i.source_name == "fc.weight")
    assert conv2.alpha_shape == (8, 1, 1, 1) and fc.alpha_shape == (10, 1)  # out channels: axis 0
    assert conv2.code_set == "pow2-4" and conv2.bits == 3 and not conv2.exact
    assert "p_conv2_weight" not in art.graph.params and art.graph.params["p_conv2_weight.codes"].shape == (8, 8, 3, 3)
    with torch.no_grad():
        expected = projected_copy(model, CNN_LAYERS, 3)(x).numpy()
    assert_close(art.run(x), expected)


def test_per_tensor_keeps_first_and_last_layers_float(cnn):
    model, x = cnn
    squeeze = Squeeze(codes="ternary", per_channel=False, first_last_codes=None, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    (info,) = art.graph.quant.values()
    assert info.source_name == "conv2.weight" and info.alpha_shape == () and info.axis is None
    check_codes(art.graph, "ternary")
    for kept in ("p_conv1_weight", "p_fc_weight"):
        assert art.graph.params[kept].dtype == np.float32
    bits = {layer.name: layer.bits for layer in art.report().layers}
    assert bits == {"conv1": 32, "conv2": 2, "fc": 32}
    assert {layer.name for layer in art.report().layers if layer.kernel == "fp32"} == {"conv1", "fc"}
    with torch.no_grad():
        expected = projected_copy(model, ["conv2"], "ternary", per_channel=False)(x).numpy()
    assert_close(art.run(x), expected)


def test_first_and_last_layers_default_to_int8_per_channel(cnn):
    model, x = cnn
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(codes="ternary", per_channel=False, integer_kernels=False))
    infos = {info.source_name: info for info in art.graph.quant.values()}
    assert set(infos) == {"conv1.weight", "conv2.weight", "fc.weight"}
    conv2, conv1, fc = infos["conv2.weight"], infos["conv1.weight"], infos["fc.weight"]
    assert conv2.code_set == "ternary" and conv2.alpha_shape == ()
    for info, channels in ((conv1, 8), (fc, 10)):
        assert info.code_set == "int8" and info.bits == 8 and info.per_channel and info.axis == 0
        assert info.alpha_shape[0] == channels and info.weight not in art.graph.params
        assert np.abs(art.graph.params[info.codes_param]).max() <= 127
    bits = {layer.name: layer.bits for layer in art.report().layers}
    assert bits == {"conv1": 8, "conv2": 2, "fc": 8}
    report = art.report()
    bias_and_bn = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("weight") or "bn" in n)
    assert report.model_bytes == (216 + 4 * 8) + (packed_bytes(576, 2) + 4) + (1280 + 4 * 10) + 4 * bias_and_bn
    with torch.no_grad():  # the reference graph is the torch model with int8 first/last and ternary middle
        expected = projected_copy(model, ["conv2"], "ternary", per_channel=False)
        for name in ("conv1", "fc"):
            layer = getattr(expected, name)
            q, alpha = project_pow2(layer.weight.numpy(), "int8", axis=0)
            layer.weight.copy_(torch.from_numpy(dequantize(q, alpha)))
    with torch.no_grad():
        assert_close(art.run(x), expected(x).numpy())


def test_onnx_model_matches_onnxruntime_with_projected_weights(cnn, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model, x = cnn
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    art = lastbit.compile(path, HOST, squeeze=Squeeze(bits=4, keep_first_last=False, integer_kernels=False))
    assert len(art.graph.quant) == 3  # conv1 (BN folded in by the exporter), conv2, fc
    check_codes(art.graph, 4)
    proto = onnx.load(str(path))
    by_name = {init.name: init for init in proto.graph.initializer}
    for info in art.graph.quant.values():
        init = by_name[info.source_name]
        original = numpy_helper.to_array(init)
        q, alpha = project_pow2(original, 4, axis=0)
        np.testing.assert_array_equal(art.graph.params[info.codes_param], q)
        init.CopyFrom(numpy_helper.from_array(dequantize(q, alpha), init.name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x.numpy()})
    assert_close(art.run(x), expected)


# --- the IR later stages match ----------------------------------------------------------------


def test_quantized_layers_are_found_by_pattern_before_and_after_binding(cnn_per_channel):
    graph = cnn_per_channel.graph
    found = find_quantized_layers(graph.mod["main"])
    assert [kind for _, kind, _ in found] == ["conv2d", "conv2d", "dense"]
    codes_names = {parts["codes"].name for _, _, parts in found}
    assert codes_names == {info.codes_param for info in graph.quant.values()}
    bound = find_quantized_layers(graph.bound_module()["main"])
    assert [kind for _, kind, _ in bound] == ["conv2d", "conv2d", "dense"]


def test_already_quantized_weights_are_recovered_exactly(cnn_graph):
    on_grid = dict(cnn_graph.params)
    for name in ("p_conv1_weight", "p_conv2_weight", "p_fc_weight"):
        q, alpha = project_pow2(on_grid[name], "pow2-4", axis=0)
        on_grid[name] = dequantize(q, alpha)
    graph = QuantizePow2(Squeeze(codes="pow2-4", keep_first_last=False))(cnn_graph.replace(params=on_grid))
    for info in graph.quant.values():
        assert info.exact
        restored = dequantize(graph.params[info.codes_param], graph.params[info.alpha_param])
        np.testing.assert_array_equal(restored, on_grid[info.weight])


# --- report arithmetic ------------------------------------------------------------------------


def test_report_counts_packed_codes_alpha_and_float_params_exactly(cnn, cnn_per_channel):
    model, _ = cnn
    report = cnn_per_channel.report()
    n_params = sum(p.numel() for p in model.parameters())
    assert report.params == n_params
    assert report.fp32_bytes == 4 * n_params
    weights = {"conv1": (216, 8), "conv2": (576, 8), "fc": (1280, 10)}  # (codes, alphas)
    quantized = sum(math.ceil(n * 3 / 8) + 4 * a for n, a in weights.values())
    float_params = n_params - sum(n for n, _ in weights.values())  # biases and BN affine
    assert report.model_bytes == quantized + 4 * float_params
    assert report.compression == report.fp32_bytes / report.model_bytes
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv2"].bits == 3 and layers["conv2"].kernel == "pow2-4 (ref)"
    assert layers["conv2"].weight_bytes == packed_bytes(576, 3) + 4 * 8 == 216 + 32
    assert layers["fc"].params == 1280 and layers["fc"].flops == 2 * 10 * 128
    assert "smaller than fp32" in report.format_table()


# --- activations ------------------------------------------------------------------------------


def layer_inputs(model, x, layers):
    seen = {name: [] for name in layers}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].abs().numpy().ravel()))
             for n in layers]
    with torch.no_grad():
        for sample in x:
            model(torch.from_numpy(sample[None]))
    for h in hooks:
        h.remove()
    return {n: np.concatenate(v) for n, v in seen.items()}


def test_calibrated_fake_quant_matches_a_numpy_reference(cnn):
    model, x = cnn
    calib = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype("float32")
    squeeze = Squeeze(bits=3, keep_first_last=False, data=calib, fake_quant_activations=True, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    scales = {i.source_name.removesuffix(".weight"): i.activation_scale for i in art.graph.quant.values()}
    # the scales are the 99.99th percentile of |input| on the weight-quantized model, / 127
    inputs = layer_inputs(projected_copy(model, CNN_LAYERS, 3), calib, CNN_LAYERS)
    for name in CNN_LAYERS:
        assert scales[name] == pytest.approx(np.percentile(inputs[name], 99.99) / 127, rel=1e-5)
    assert all(i.activation_calibration == "percentile-99.99 of 8 samples" for i in art.graph.quant.values())
    assert "R.round" in art.graph.mod.script(show_meta=False)
    with torch.no_grad():
        expected = projected_copy(model, CNN_LAYERS, 3, input_scales=scales)(x).numpy()
        unquantized = projected_copy(model, CNN_LAYERS, 3)(x).numpy()
    out = art.run(x)
    assert_close(out, expected)
    assert not np.allclose(out, unquantized, rtol=0, atol=1e-6)  # the activations really are rounded


def test_dynamic_fake_quant_without_data(cnn):
    model, x = cnn
    squeeze = Squeeze(bits=2, keep_first_last=False, fake_quant_activations=True, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    assert all(i.activation_scale is None and i.activation_calibration == "dynamic" for i in art.graph.quant.values())
    with torch.no_grad():
        expected = projected_copy(model, CNN_LAYERS, 2, input_scales=dict.fromkeys(CNN_LAYERS))(x).numpy()
    assert_close(art.run(x), expected)


def test_fake_quant_reference_rounds_half_to_even_and_clips():
    np.testing.assert_array_equal(fake_quant_int8(np.array([0.5, 1.5, -2.5], "float32"), 1.0), [0.0, 2.0, -2.0])
    np.testing.assert_array_equal(fake_quant_int8(np.array([0.125, 0.375, -40.0], "float32"), 0.25), [0.0, 0.5, -31.75])
    x = np.array([0.25, -9.0], "float32")
    assert fake_quant_int8(x, None)[-1] == pytest.approx(-9.0, rel=1e-6)  # dynamic: max|x| maps to -127·s
    np.testing.assert_array_equal(fake_quant_int8(np.zeros(3, "float32"), None), 0.0)


# --- the data-dependent path ------------------------------------------------------------------


def _mlp_and_labelled_data():
    """A seeded SmallMLP, 64 random labelled vectors and one input: the data-dependent tests' problem."""
    torch.manual_seed(0)
    model = SmallMLP().eval()
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((64, 32)).astype("float32"), rng.integers(0, 10, 64))
    return model, data, torch.from_numpy(data[0][:1])


def test_admm_path_lands_on_codes_and_matches_the_tuned_module():
    model, data, x = _mlp_and_labelled_data()
    squeeze = Squeeze(bits=3, keep_first_last=False, data=data, epochs=1, batch_size=16, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    tuned = art.torch_module
    assert tuned is not model and tuned is not None
    assert {i.source_name for i in art.graph.quant.values()} == {"fc1.weight", "fc2.weight"}
    assert all(i.exact for i in art.graph.quant.values())  # ADMM put them on α·codes already
    check_codes(art.graph, 3)
    for info in art.graph.quant.values():
        restored = dequantize(art.graph.params[info.codes_param], art.graph.params[info.alpha_param])
        np.testing.assert_array_equal(restored, tuned.state_dict()[info.source_name].numpy())
    with torch.no_grad():
        assert_close(art.run(x), tuned(x).numpy())
        expected_acc = float((tuned(torch.from_numpy(data[0])).argmax(1).numpy() == data[1]).mean())
    assert art.report().accuracy == pytest.approx(expected_acc)
    assert not np.array_equal(tuned.fc1.weight.detach().numpy(), model.fc1.weight.detach().numpy())


def test_admm_carries_recalibrated_batchnorm_statistics_into_the_graph(cnn):
    model, x = cnn
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((32, 3, 8, 8)).astype("float32"), rng.integers(0, 10, 32))
    squeeze = Squeeze(bits=3, data=data, epochs=1, batch_size=16, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    tuned = art.torch_module
    assert not torch.equal(tuned.bn1.running_mean, model.bn1.running_mean)  # ADMM re-estimated them
    infos = {info.source_name: info for info in art.graph.quant.values()}
    assert infos["conv2.weight"].code_set == "pow2-4"
    # conv1 and fc are trained float and stored int8 by ADMM, and the graph recovers those codes exactly
    assert infos["conv1.weight"].code_set == infos["fc.weight"].code_set == "int8"
    assert all(info.exact for info in infos.values())
    conv1 = infos["conv1.weight"]
    restored = dequantize(art.graph.params[conv1.codes_param], art.graph.params[conv1.alpha_param])
    np.testing.assert_array_equal(restored, tuned.conv1.weight.detach().numpy())
    with torch.no_grad():
        assert_close(art.run(x), tuned(x).numpy())


def test_squeeze_passes_follow_the_mode():
    model = SmallMLP()
    labelled = (np.zeros((4, 32), "float32"), np.zeros(4, "int64"))
    names = lambda passes: [type(p).__name__ for p in passes]  # noqa: E731
    assert squeeze_passes(None) == [] and squeeze_passes(Squeeze()) == []
    assert names(squeeze_passes(Squeeze(bits=3, data=labelled), model)) == ["AdmmFinetune", "QuantizePow2"]
    assert names(squeeze_passes(Squeeze(bits=3, data=labelled))) == ["QuantizePow2"]  # no torch module
    assert names(squeeze_passes(Squeeze(bits=3, data=labelled, mode="data-free"), model)) == ["QuantizePow2"]
    assert names(squeeze_passes(Squeeze(bits=3, data=labelled[0]), model)) == ["QuantizePow2"]  # no labels
    with pytest.raises(QuantizationError, match="torch.nn.Module"):
        squeeze_passes(Squeeze(bits=3, data=labelled, mode="admm"))
    ste = squeeze_passes(Squeeze(bits=3, data=labelled, mode="ste"), model)
    assert names(ste) == ["AdmmFinetune", "QuantizePow2"] and ste[0].mode == "ste"
    assert squeeze_passes(Squeeze(bits=3, data=labelled), model)[0].mode == "admm"
    with pytest.raises(QuantizationError, match="mode='ste'.*torch.nn.Module"):
        squeeze_passes(Squeeze(bits=3, data=labelled, mode="ste"))
    with pytest.raises(QuantizationError, match="mode='ste' needs labelled data"):
        squeeze_passes(Squeeze(bits=3, data=labelled[0], mode="ste"), model)


def test_ste_mode_trains_straight_through_and_lands_on_codes():
    """mode="ste" runs ste_finetune (not ADMM) on the same data and settings, and the graph
    recovers its codes exactly as it does ADMM's."""
    from lastbit.passes.admm import ste_finetune

    model, data, x = _mlp_and_labelled_data()
    common = dict(bits=3, keep_first_last=False, data=data, epochs=1, batch_size=16, integer_kernels=False)
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(mode="ste", **common))
    tuned = art.torch_module
    assert all(i.exact for i in art.graph.quant.values())
    check_codes(art.graph, 3)
    with torch.no_grad():
        assert_close(art.run(x), tuned(x).numpy())
    direct = ste_finetune(model, data, "pow2-4", epochs=1, batch_size=16, lr_schedule="cosine", skip=(),
                          per_channel=True, progress=False)
    for name, weight in direct.module.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], weight), name  # the same trainer, the same settings
    admm = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(mode="admm", **common)).torch_module
    assert not torch.equal(admm.fc1.weight, tuned.fc1.weight)


# --- configuration and errors -----------------------------------------------------------------


def test_from_cli_parses_scheme_and_width():
    assert Squeeze.from_cli("pow2:3") == Squeeze(bits=3)
    assert Squeeze.from_cli("pow2:ternary").code_set.name == "ternary"
    assert Squeeze.from_cli("pow2:4", per_channel=False).per_channel is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bit width 5"),
        (dict(bits=0), "bit width 0"),
        (dict(bits=True), "True"),
        (dict(codes="pow2-3"), "'pow2-3'"),
        (dict(bits=3, scheme="int"), "'int'"),
        (dict(bits=3, mode="fast"), "'fast'"),
        (dict(bits=3, mode="admm"), "training data"),
        (dict(bits=3, mode="ste"), "mode='ste' needs training data"),
        (dict(bits=3, mode="ste", data=(np.zeros((2, 4), "float32"), np.zeros(2, "int64")),
              admm_options={"fixed_fraction": 0.1}), "'fixed_fraction' is not an option of mode='ste'"),
        (dict(bits=3, admm_options={"rho_grwoth": 1.2}), "'rho_grwoth' is not an option of mode='auto'"),
        (dict(bits=3, mode="ste", data=(np.zeros((2, 4), "float32"), np.zeros(2, "int64")), prune=0.5),
         "mode='ste' fine-tunes the unpruned"),
        (dict(bits=3, activation_percentile=0), "activation_percentile"),
        (dict(bits=3, first_last_codes="int4"), "'int4'"),
    ],
)
def test_bad_configuration_names_the_value(kwargs, message):
    with pytest.raises(QuantizationError, match=message):
        Squeeze(**kwargs)


@pytest.mark.parametrize("spec", ["pow2", "pow2:", ":3", "pow2:9", "lut:3"])
def test_bad_cli_spec_is_a_quantization_error(spec):
    with pytest.raises(QuantizationError):
        Squeeze.from_cli(spec)


@pytest.mark.parametrize("spec", ["pow2:3:x", "pow2:3 4", "pow2:tern/ary"])
def test_malformed_cli_spec_is_reported_as_malformed(spec):
    with pytest.raises(QuantizationError, match="malformed") as info:
        Squeeze.from_cli(spec)
    assert repr(spec) in str(info.value) and "unknown code set" not in str(info.value)


class _WideMiddle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = torch.nn.Linear(8, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 4)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_warns_when_first_and_last_layers_hold_most_weights(caplog):
    torch.manual_seed(0)
    one_layer = from_torch(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(1, 64),))
    with caplog.at_level(logging.WARNING, logger="lastbit.passes.quantize_pow2"):
        QuantizePow2(Squeeze(bits=3))(one_layer)
    warned = [r.getMessage() for r in caplog.records if "keep_first_last=False" in r.getMessage()]
    assert len(warned) == 1 and "100%" in warned[0] and "int8" in warned[0] and "--no-keep-first-last" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lastbit.passes.quantize_pow2"):
        QuantizePow2(Squeeze(bits=3, keep_first_last=False))(one_layer)  # the user chose: no warning
        QuantizePow2(Squeeze(bits=3))(from_torch(_WideMiddle().eval(), (torch.randn(1, 8),)))  # first+last: 5%
    assert not [r for r in caplog.records if "keep_first_last" in r.getMessage()]


def dense_graph(weight: np.ndarray, reshape_to: tuple[int, int] | None = None) -> Graph:
    """x[1, K] @ permute_dims(W[N, K]) (or @ reshape(W) when reshape_to is given)."""
    from tvm import relax

    k = reshape_to[0] if reshape_to else weight.shape[1]
    x = relax.Var("x", relax.TensorType((1, k), "float32"))
    w = relax.Var("w", relax.TensorType(weight.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], {"num_input": 1}):
        with bb.dataflow():
            view = relax.op.reshape(w, reshape_to) if reshape_to else relax.op.permute_dims(w, [1, 0])
            y = bb.emit_output(bb.emit(relax.op.matmul(x, bb.emit(view))))
        bb.emit_func_output(y)
    return Graph(mod=bb.get(), params={"w": weight}, inputs=[TensorSpec("x", (1, k))])


def test_empty_layer_is_a_quantization_error():
    with pytest.raises(QuantizationError, match="empty"):
        QuantizePow2(Squeeze(bits=3, keep_first_last=False))(dense_graph(np.zeros((4, 0), "float32")))


def test_reshaped_weight_is_skipped_per_channel_but_quantized_per_tensor(caplog):
    weight = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    graph = dense_graph(weight, reshape_to=(8, 4))
    with caplog.at_level(logging.INFO, logger="lastbit.passes.quantize_pow2"):
        same = QuantizePow2(Squeeze(bits=3, keep_first_last=False))(graph)
    assert same.quant == {} and same.params["w"] is weight
    assert "reshaped" in caplog.text
    quantized = QuantizePow2(Squeeze(bits=3, keep_first_last=False, per_channel=False))(graph)
    assert set(quantized.params) == {"w.codes", "w.alpha"} and quantized.quant["w"].alpha_shape == ()


def test_cli_compile_with_quant_prints_bits_and_compression(tmp_path):
    from click.testing import CliRunner

    from lastbit.cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    x = torch.zeros(1, 32)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    args = ["compile", str(path), "--quant", "pow2:2", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    from lastbit.codegen.kernels import list_kernels

    # the middle layer: 2-bit codes on the integer kernel the host picked (codegen/quant_lowering.py)
    assert any(f"   2  {k.name}" in result.output for k in list_kernels()), result.output
    assert "smaller than fp32" in result.output
    bad = CliRunner().invoke(main, ["compile", str(path), "--quant", "pow2:7", "-o", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "bit width 7" in str(bad.exception or bad.output)

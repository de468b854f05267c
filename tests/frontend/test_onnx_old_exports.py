"""Old-style ONNX exports (opset 7-9, initializers listed among the graph inputs, weights built
with ConstantOfShape from int64 shape initializers): every output matches onnxruntime."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lastbit
from lastbit.errors import NodeImportError
from lastbit.frontend import from_onnx

from tests.conftest import SmallCNN, _randomize_bn, assert_close


class _TwoHeads(torch.nn.Module):
    """Two outputs, a Reshape with an int64 shape and a Gemm, so every output gets checked."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.reshape(1, -1)), y.mean(dim=(2, 3))


def _filled(module: torch.nn.Module) -> torch.nn.Module:
    """Give some weights one value each, the ones an old exporter wrote as ConstantOfShape."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.25)
                m.bias.fill_(-0.1)
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.fill_(0.05)
    return module


def _old_export(module, x, path, opset: int, constant_of_shape: bool, shapes_as_inputs: bool = False):
    """torch's legacy exporter with initializers kept as inputs; then, like a Caffe2-era export,
    every single-valued weight becomes ConstantOfShape(shape initializer)."""
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                      keep_initializers_as_inputs=True, do_constant_folding=False)
    proto = onnx.load(str(path))
    graph = proto.graph
    assert len(graph.input) > 1 and {i.name for i in graph.initializer} <= {i.name for i in graph.input}
    if constant_of_shape:
        made = []
        for init in list(graph.initializer):
            value = numpy_helper.to_array(init)
            if value.dtype != np.float32 or value.size < 2 or not np.all(value == value.flat[0]):
                continue
            shape_name = f"{init.name}__shape"
            graph.initializer.append(numpy_helper.from_array(np.array(value.shape, np.int64), shape_name))
            if shapes_as_inputs:  # IR 3 lists every initializer as an input, the shapes too
                graph.input.append(helper.make_tensor_value_info(shape_name, TensorProto.INT64, [value.ndim]))
            made.append(helper.make_node("ConstantOfShape", [shape_name], [init.name], name=f"fill_{init.name}",
                                         value=numpy_helper.from_array(value.reshape(-1)[:1])))
            graph.initializer.remove(init)
            graph.input.remove(next(i for i in graph.input if i.name == init.name))
        assert made, "the model has no single-valued weight to rewrite"
        nodes = made + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    if shapes_as_inputs:
        proto.ir_version = 3
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def _check_against_onnxruntime(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    expected = sess.run(None, {input_name: x})
    outputs = lastbit.compile(path).run(x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    assert len(outputs) == len(expected)
    for got, ref in zip(outputs, expected):
        assert np.ptp(ref) > 1e-3, "a constant reference would make the check vacuous"
        assert_close(got, ref, rtol=1e-5)


@pytest.mark.parametrize("opset,constant_of_shape,shapes_as_inputs", [
    (7, False, False), (8, False, False), (9, True, False), (9, True, True),
])
def test_old_cnn_export_matches_onnxruntime(tmp_path, opset, constant_of_shape, shapes_as_inputs):
    torch.manual_seed(0)
    model = _filled(_randomize_bn(SmallCNN()))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("float32")
    path = tmp_path / "old.onnx"
    _old_export(model, torch.from_numpy(x), path, opset, constant_of_shape, shapes_as_inputs)
    _check_against_onnxruntime(path, x)


def test_old_two_output_export_matches_onnxruntime(tmp_path):
    torch.manual_seed(1)
    model = _filled(_randomize_bn(_TwoHeads()))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32")
    path = tmp_path / "heads.onnx"
    _old_export(model, torch.from_numpy(x), path, opset=9, constant_of_shape=True)
    graph = from_onnx(path)
    assert [spec.name for spec in graph.inputs] == ["x"]
    assert all(np.asarray(v).dtype == np.float32 for v in graph.params.values())  # int64 shapes are constants
    for relax_name, onnx_name in graph.source_names.items():  # every weight is its own initializer
        init = next(i for i in onnx.load(str(path)).graph.initializer if i.name == onnx_name)
        np.testing.assert_array_equal(graph.params[relax_name], numpy_helper.to_array(init))
    _check_against_onnxruntime(path, x)


def test_initializer_named_as_input_becomes_an_input(tmp_path):
    w = np.arange(12, dtype="float32").reshape(3, 4) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    x = np.ones((2, 3), "float32")
    as_constant = from_onnx(proto)
    assert [s.name for s in as_constant.inputs] == ["x"] and list(as_constant.params) == ["w"]
    as_input = from_onnx(proto, initializer_inputs=["w"])
    assert [s.name for s in as_input.inputs] == ["x", "w"] and not as_input.params
    w2 = np.full((3, 4), 2.0, "float32")
    np.testing.assert_allclose(lastbit.compile(as_input).run(x, w2), x @ w2, rtol=1e-6)
    np.testing.assert_allclose(lastbit.compile(as_constant).run(x), x @ w, rtol=1e-6)


def _bad_conv_model(path):
    """A Conv whose weight is 1-D: the checker passes it, TVM's frontend does not."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["y"], name="stem_conv", kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(np.ones(8, "float32"), "conv_w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_frontend_error_names_node_op_and_inputs(tmp_path):
    path = tmp_path / "bad.onnx"
    _bad_conv_model(path)
    with pytest.raises(NodeImportError) as info:
        from_onnx(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "Conv" in message and "stem_conv" in message and "conv_w float32[8]" in message
    assert "ir.Op(" not in message  # TVM's operator repr is shortened to its name


def test_cli_prints_frontend_error_without_traceback(tmp_path):
    path = tmp_path / "bad.onnx"
    _bad_conv_model(path)
    proc = subprocess.run([sys.executable, "-m", "lastbit.cli", "compile", str(path), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "stem_conv" in proc.stderr and proc.stderr.strip().count("\n") == 0

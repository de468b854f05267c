"""torch and ONNX import: names, shapes, and the errors bad models get."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import lastbit
from lastbit.errors import ModelFormatError, UnsupportedOpError
from lastbit.frontend import from_onnx, from_torch


def test_torch_import_keeps_parameter_names(small_cnn):
    model, x = small_cnn
    graph = from_torch(model, (x,))
    assert graph.inputs[0].shape == (1, 3, 8, 8)
    torch_names = set(graph.source_names.values())
    assert {"conv1.weight", "conv1.bias", "bn1.weight", "conv2.weight", "fc.weight", "fc.bias"} <= torch_names
    state = model.state_dict()
    for relax_name, torch_name in graph.source_names.items():
        np.testing.assert_array_equal(graph.params[relax_name], state[torch_name].numpy())
    assert graph.num_params == sum(p.numel() for p in model.parameters())


def test_onnx_import_maps_initializers(small_cnn, tmp_path):
    model, x = small_cnn
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    graph = from_onnx(path)
    assert graph.name == "cnn" and graph.inputs[0].shape == (1, 3, 8, 8)
    assert "fc.weight" in graph.source_names.values()


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


def test_unsupported_torch_op_names_op_and_node():
    with pytest.raises(UnsupportedOpError) as info:
        from_torch(_Unsupported(), (torch.randn(4, 4),))
    assert "svd" in str(info.value).lower()


def test_unsupported_onnx_op_names_op_and_node(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="weird_node", domain="")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError) as info:
        from_onnx(proto)
    assert "NoSuchOp" in str(info.value) and "weird_node" in str(info.value)


def test_truncated_onnx_is_one_clear_error(small_mlp, tmp_path):
    model, x = small_mlp
    good = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(good), dynamo=False)
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFormatError) as info:
        from_onnx(bad)
    assert "truncated.onnx" in str(info.value)


def test_missing_and_unknown_model_files(tmp_path):
    with pytest.raises(ModelFormatError, match="no such"):
        lastbit.compile(tmp_path / "absent.onnx")
    other = tmp_path / "model.h5"
    other.write_bytes(b"\0")
    with pytest.raises(ModelFormatError, match="unknown model file type"):
        lastbit.compile(other)


def test_pt2_round_trip(small_mlp, tmp_path):
    model, x = small_mlp
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    graph = lastbit.pipeline.import_model(path, trust_pickle=True)
    assert graph.inputs[0].shape == (1, 32)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelFormatError, match="junk.pt2"):
        lastbit.pipeline.import_model(tmp_path / "junk.pt2", trust_pickle=True)


class _Payload:
    """Unpickling this touches ``marker``: stands in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _crafted_pt2(tmp_path, marker):
    """A real .pt2 whose pickled sample inputs are replaced by a payload; torch.export.load
    unpickles that entry (it retries with weights_only=False)."""
    import io
    import zipfile

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)), str(good))
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, payload.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data)
    return evil


def test_pt2_with_pickle_payload_is_refused_without_running_it(tmp_path):
    from lastbit.errors import UntrustedModelError

    marker = tmp_path / "payload-ran"
    evil = _crafted_pt2(tmp_path, marker)
    with pytest.raises(UntrustedModelError, match="trust_pickle=True") as info:
        lastbit.compile(evil)
    assert "--trust-pickle" in str(info.value) and "evil.pt2" in str(info.value)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "lastbit.cli", "compile", str(evil), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--trust-pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The file really is malicious: opting in runs the payload (which is why it is opt-in).
    with pytest.raises(ModelFormatError):
        lastbit.pipeline.import_model(evil, trust_pickle=True)
    assert marker.exists()


class _DilatedUnfold(torch.nn.Module):
    """An op TVM's torch frontend has a converter for but fails on (dilated im2col)."""

    def forward(self, x):
        return torch.nn.functional.unfold(x, 3, dilation=2)


def test_torch_frontend_error_names_node_in_one_line():
    from lastbit.errors import NodeImportError

    with pytest.raises(NodeImportError) as info:
        from_torch(_DilatedUnfold(), (torch.randn(1, 3, 8, 8),))
    message = str(info.value)
    assert "\n" not in message
    # unfold decomposes into index + permute; TVM's permute converter fails on it
    assert "aten.permute" in message and "node 'permute'" in message
    assert "float32[1,3,3,4,3,4]" in message  # its input, with shape

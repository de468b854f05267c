"""Checking a compiled model against its source, and flagging checks that prove nothing."""

import logging

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import lastbit
from lastbit.check import check_against_source, degenerate_reason
from lastbit.cli import main


def _constant_output_onnx(path):
    """y = x·0 + b: the same logits whatever the input (a broken export looks like this)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["z"], name="mul"),
         helper.make_node("Add", ["z", "b"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.zeros((1, 4), "float32"), "zero"),
         numpy_helper.from_array(np.full((1, 4), 0.25, "float32"), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_degenerate_reason():
    assert degenerate_reason([np.full((2, 5), 3.0)]) is not None
    assert degenerate_reason([np.full((2, 5), 3.0), np.arange(4.0)]) is None  # one output varies
    assert degenerate_reason([np.linspace(0, 1e-3, 10)]) is None
    assert degenerate_reason([np.ones(1)]) is None  # a single value is not a pattern


def test_check_matches_a_real_model_and_warns_on_a_constant_one(small_mlp, tmp_path, caplog):
    model, x = small_mlp
    result = check_against_source(lastbit.compile(model, example_inputs=(x,)), model)
    assert result.reference == "torch" and result.max_rel_err < 1e-5 and result.degenerate is None

    path = _constant_output_onnx(tmp_path / "const.onnx")
    with caplog.at_level(logging.WARNING, logger="lastbit.check"):
        result = check_against_source(lastbit.compile(path), path)
    assert result.reference == "onnxruntime" and result.max_rel_err == 0.0
    assert result.degenerate and "checks nothing" in result.degenerate and "0.25" in result.degenerate
    assert any("checks nothing" in r.getMessage() for r in caplog.records)
    assert "warning:" in result.format()


def test_cli_check_and_run_warn_on_constant_outputs(tmp_path):
    path = _constant_output_onnx(tmp_path / "const.onnx")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert "check vs onnxruntime" in result.output and "checks nothing" in result.output
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 4)).astype("float32"))
    result = CliRunner().invoke(main, ["run", str(out), "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == 0 and "top-5 indices mean nothing" in result.stderr


def test_cli_check_on_a_varied_model_prints_no_warning(small_mlp, tmp_path):
    model, x = small_mlp
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "out"), "--check"])
    assert result.exit_code == 0, result.output
    assert "check vs onnxruntime" in result.output and "warning" not in result.output

"""lastbit.compile end to end on the host: run, report, export, dump-ir, bad inputs."""

import json

import numpy as np
import pytest
import torch

import lastbit
from lastbit.errors import RunError
from tests.conftest import assert_close


def test_compile_and_run_matches_torch(small_cnn):
    model, x = small_cnn
    artifact = lastbit.compile(model, "x86_64-linux-gnu", (x,))
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(artifact.run(x.numpy()), expected)
    assert_close(artifact.run(x), expected)  # torch tensors are accepted too


def test_onnx_model_compiles_to_the_same_output(small_cnn, tmp_path):
    model, x = small_cnn
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    artifact = lastbit.compile(path)
    with torch.no_grad():
        assert_close(artifact.run(x.numpy()), model(x).numpy())


def test_report_counts_params_bytes_and_flops(small_cnn):
    model, x = small_cnn
    report = lastbit.compile(model, example_inputs=(x,)).report()
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.model_bytes == 4 * report.params
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"conv1", "conv2", "fc"}
    assert by_name["conv1"].flops == 2 * (8 * 8 * 8) * (3 * 3 * 3)
    assert by_name["conv2"].flops == 2 * (8 * 8 * 8) * (8 * 3 * 3)
    assert by_name["fc"].flops == 2 * 10 * 128
    assert report.flops == sum(layer.flops for layer in report.layers)
    assert "conv2" in report.format_table()


def test_wrong_input_is_one_clear_error(small_mlp):
    model, x = small_mlp
    artifact = lastbit.compile(model, example_inputs=(x,))
    with pytest.raises(RunError, match="expected shape"):
        artifact.run(np.zeros((2, 32), "float32"))
    with pytest.raises(RunError, match="dtype"):
        artifact.run(np.zeros((1, 32), "float64"))
    with pytest.raises(RunError, match="takes 1 input"):
        artifact.run(x, x)


def test_dump_ir_writes_one_file_per_phase(small_mlp, tmp_path):
    model, x = small_mlp
    lastbit.compile(model, example_inputs=(x,), dump_ir=tmp_path / "ir")
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names == ["0-imported.py", "1-squeezed.py", "2-lowered.py", "3-scheduled.py"]
    assert "call_tir" in (tmp_path / "ir" / "2-lowered.py").read_text()


def test_export_writes_bundle_with_manifest(small_mlp, tmp_path):
    model, x = small_mlp
    out = lastbit.compile(model, example_inputs=(x,)).export(tmp_path / "bundle")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "x86_64-linux-gnu"
    assert manifest["inputs"][0]["shape"] == [1, 32]
    assert {"kernels.so", "plan.txt", "params.bin", "lastbit_run"} <= {p.name for p in out.iterdir()}


def test_function_times_name_every_function_main_calls(small_mlp):
    model, x = small_mlp
    art = lastbit.compile(model, example_inputs=(x,), squeeze=lastbit.Squeeze(bits=3))
    times = art.function_times_ms(x, runs=2)
    called = {gv.name_hint for gv, f in art.mod.functions_items() if gv.name_hint != "main"
              and gv.name_hint in art.mod["main"].script(show_meta=False)}
    assert called and called <= set(times)  # every PrimFunc of main, timed
    assert all(ms >= 0 for ms in times.values()) and any(name.startswith("vm.builtin") for name in times)
    with pytest.raises(RunError, match="cannot be profiled"):
        lastbit.compile(model, target="aarch64-linux-gnu", example_inputs=(x,)).function_times_ms(x)

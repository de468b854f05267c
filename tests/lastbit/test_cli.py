"""The CLI is a thin layer: compile a model file, run the bundle, list targets, fail clearly."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lastbit.cli import main
from tests.conftest import assert_close


def test_targets_lists_every_triple():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0
    for triple in ("x86_64-linux-gnu", "aarch64-linux-gnu", "armv7a-linux-gnueabihf"):
        assert triple in result.output


def test_compile_then_run_an_onnx_file(small_mlp, tmp_path):
    model, x = small_mlp
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["x"])
    bundle = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(onnx_path), "--target", "x86_64-linux-gnu", "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "fc1" in result.output or "dense" in result.output
    np.save(tmp_path / "x.npy", x.numpy())
    result = CliRunner().invoke(main, ["run", str(bundle), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        assert_close(np.load(tmp_path / "y.npy"), model(x).numpy())


def test_errors_exit_2_with_one_line(tmp_path):
    onnx_path = tmp_path / "absent.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "lastbit.cli", "compile", str(onnx_path), "--target", "nowhere-linux", "-o", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown target 'nowhere-linux'")
    assert not (tmp_path / "o").exists()


def test_run_input_that_is_not_npy_is_one_line_error(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (tmp_path / "x.txt").write_text("1 2 3\n")
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    proc = subprocess.run([sys.executable, "-m", "lastbit.cli", "run", str(bundle), "--input", str(tmp_path / "x.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith(f"error: --input {tmp_path / 'x.txt'}: not a .npy array file")
    from lastbit.errors import RunError

    result = CliRunner().invoke(main, ["run", str(bundle), "--input", str(tmp_path / "x.npz")])
    assert isinstance(result.exception, RunError) and "an .npz archive" in str(result.exception)


def _compiles_with_fashion_mnist(args: list[str], out) -> None:
    """`lastbit compile ARGS -o OUT` with --data fashion-mnist:N among ARGS writes a bundle
    (skipped where the dataset package is not installed)."""
    result = CliRunner().invoke(main, ["compile", *args, "-o", str(out)])
    if "dataset-fashion-mnist" in result.output + str(result.exception):
        pytest.skip("Fashion-MNIST is not installed (make system-deps)")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "manifest.json").is_file()


def test_taylor_pruning_from_the_cli_with_a_builtin_dataset(tmp_path):
    _compiles_with_fashion_mnist(["lenet5", "--untrained", "--prune", "0.25", "--prune-criterion", "taylor",
                                  "--data", "fashion-mnist:64"], tmp_path / "out")
    missing = CliRunner().invoke(main, ["compile", "lenet5", "--untrained", "--prune", "0.25", "--prune-criterion",
                                        "taylor", "-o", str(tmp_path / "out2")])
    assert missing.exit_code == 2 and "--data fashion-mnist" in missing.output
    bad = CliRunner().invoke(main, ["compile", "lenet5", "--untrained", "--prune", "0.25", "--data", "digits:x",
                                    "-o", str(tmp_path / "out3")])
    assert bad.exit_code == 2 and "NAME:N" in bad.output


def test_finetune_ste_from_the_cli(tmp_path):
    missing = CliRunner().invoke(main, ["compile", "lenet5", "--untrained", "--quant", "pow2:3", "--finetune", "ste",
                                        "-o", str(tmp_path / "out0")])
    assert missing.exit_code == 2 and "--finetune ste" in missing.output and "--data" in missing.output
    assert not (tmp_path / "out0").exists()
    _compiles_with_fashion_mnist(["lenet5", "--untrained", "--quant", "pow2:ternary", "--data", "fashion-mnist:64",
                                  "--finetune", "ste"], tmp_path / "out")


def test_accel_dse_sweeps_and_searches(small_mlp, tmp_path):
    import json

    model, x = small_mlp
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["x"])
    out = tmp_path / "dse"
    args = ["accel-dse", str(onnx_path), "--sweep", "rows=4,8", "--sweep", "pe=shift-add,mac8", "--base", "small",
            "--budget-energy", "1000", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "joint search:" in result.output
    sweep = json.loads((out / "dse.json").read_text())
    assert len(sweep["table"]) == 4 and sweep["front"]
    joint = json.loads((out / "joint.json").read_text())
    assert joint["best"]["energy_pj"] <= 1000e6 and len(joint["best"]["code_sets"]) == sweep["layers"]
    assert {"dse.png", "joint.png"} <= {p.name for p in out.iterdir()}
    bad = CliRunner().invoke(main, ["accel-dse", str(onnx_path), "--sweep", "rows=0", "-o", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "rows: 0 is not a positive integer" in str(bad.exception)
    assert not (tmp_path / "bad").exists()


def test_datafree_from_the_cli(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", "resnet8", "--untrained", "--quant", "pow2:ternary", "--datafree",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    # the zoo model's input range clamps the synthetic images, and the report says what ran
    assert ("data-free calibration on 32 synthetic DeepInversion images clamped to [0, 1]: 9 BN folded"
            in result.output)
    assert "bias correction + GPTQ codes" in result.output and (out / "manifest.json").is_file()
    for args, message in ((["--input-range", "0:1"], "add --datafree"),
                          (["--datafree", "--input-range", "1:0"], "LOW < HIGH"),
                          (["--datafree", "--input-range", "a:b"], "LOW:HIGH"),
                          (["--datafree", "--data", "digits:64", "--finetune", "ste"], "exclude each other")):
        bad = CliRunner().invoke(main, ["compile", "lenet5", "--untrained", "--quant", "pow2:3", *args,
                                        "-o", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    missing = CliRunner().invoke(main, ["compile", "lenet5", "--untrained", "--datafree", "-o", str(tmp_path / "bad")])
    assert missing.exit_code == 2 and "add --quant" in missing.output
    assert not (tmp_path / "bad").exists()


def test_datafree_input_range_defaults_to_the_zoo_models():
    from lastbit.cli import _datafree_squeeze
    from lastbit.frontend.models.efficientnet import TF_MEAN_RGB, TF_STD_RGB

    pixels = ((0 - TF_MEAN_RGB[0]) / TF_STD_RGB[0], (1 - TF_MEAN_RGB[0]) / TF_STD_RGB[0])
    assert _datafree_squeeze("efficientnet-lite0", "pow2:3", True, None, None)["datafree"].synthetic_range == pixels
    assert _datafree_squeeze("resnet20", "pow2:3", True, None, None)["datafree"].synthetic_range == (0.0, 1.0)
    assert _datafree_squeeze("model.onnx", "pow2:3", True, None, None)["datafree"].synthetic_range is None
    assert _datafree_squeeze("resnet18", "pow2:3", True, None, None)["datafree"].synthetic_range is None  # random init
    given = _datafree_squeeze("resnet20", "pow2:3", True, "-1:1", (np.zeros((4, 1, 28, 28)), np.zeros(4)))
    assert given["datafree"].synthetic_range == (-1.0, 1.0) and given["data"].shape == (4, 1, 28, 28)
    assert given["mode"] == "data-free"

"""Pruning, low-rank and sparsity through the user-facing layers: Squeeze, the pipeline's
fixed pass order, lastbit.compile, the report and the CLI flags."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lastbit.api import compile as lastbit_compile
from lastbit.cli import main
from lastbit.errors import LastbitError
from lastbit.passes.lowrank import LowRank
from lastbit.passes.prune_channels import PruneChannels
from lastbit.passes.quantize_pow2 import QuantizePow2
from lastbit.passes.sparsity import Sparsify
from lastbit.pipeline import squeeze_passes
from lastbit.squeeze import Squeeze


@pytest.mark.parametrize("bad, match", [
    ({"prune": 1.5}, "1.5"),
    ({"prune": "flops:7"}, "flops"),
    ({"prune": 0.5, "prune_criterion": "random"}, "random"),
    ({"prune": 0.5, "prune_criterion": "taylor"}, "labelled data"),
    ({"rank": "lots"}, "lots"),
    ({"sparsity": 1.0}, "1.0"),
    ({"prune": 0.5, "bits": 3, "mode": "admm", "data": (np.zeros((2, 3)), np.zeros(2))}, "prune, rank or sparsity"),
])
def test_squeeze_rejects_bad_structural_settings(bad, match):
    with pytest.raises(LastbitError, match=match):
        Squeeze(**bad)


def test_passes_run_in_the_fixed_order():
    data = (np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    sq = Squeeze(prune=0.5, rank="auto", sparsity=0.5, bits=3, data=data)
    passes = squeeze_passes(sq, torch_module=torch.nn.Linear(3, 2))
    assert [type(p) for p in passes] == [PruneChannels, LowRank, Sparsify, QuantizePow2]
    assert sq.resolved_mode(True) == "data-free"  # ADMM would fine-tune the unpruned module
    assert not Squeeze(prune=0.5).quantizes


def test_compile_prunes_for_real_and_reports_before_after(small_cnn):
    model, x = small_cnn
    art = lastbit_compile(model, "x86_64-linux-gnu", (x,), squeeze=Squeeze(prune=0.5, sparsity=0.5))
    assert art.run(x.numpy()).shape == (1, 10)
    assert art.graph.params["p_conv1_weight"].shape == (4, 3, 3, 3)
    report = art.report()
    assert report.flops_before["conv1"] == 2 * 8 * 8 * 8 * 27
    assert report.flops < sum(report.flops_before.values())
    assert report.encoded_bytes is not None and report.encoded_compression > 1.0
    table = report.format_table()
    assert "pruning/low-rank" in table and "sparse storage" in table
    assert "conv1" in table.split("pruning/low-rank")[1]


def test_cli_flags_reach_the_squeeze(small_mlp, tmp_path):
    model, x = small_mlp
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["x"])
    result = CliRunner().invoke(main, ["compile", str(onnx_path), "-o", str(tmp_path / "out"), "--prune", "0.5",
                                       "--lowrank", "flops:0.5", "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    assert "pruning/low-rank" in result.output and "sparse storage" in result.output
    result = CliRunner().invoke(main, ["compile", str(onnx_path), "-o", str(tmp_path / "o2"), "--prune", "2"])
    assert result.exit_code != 0 and "prune ratio" in str(result.exception)  # _entry prints it as one line


def test_pruned_sparse_model_quantizes_and_runs(small_cnn):
    model, x = small_cnn
    sq = Squeeze(prune=0.5, sparsity=0.5, bits=3)
    art = lastbit_compile(model, "x86_64-linux-gnu", (x,), squeeze=sq)
    out = art.run(x.numpy())
    assert out.shape == (1, 10) and np.isfinite(out).all()
    codes = art.graph.params["p_conv2_weight.codes"]
    assert codes.shape == (4, 4, 3, 3) and (codes == 0).mean() >= 0.5
    report = art.report()
    assert report.encoded_compression > report.compression  # zeros cost less than dense codes

"""The roofline pieces the tuning benchmark reports with: useful MACs per integer kernel, the
peak loop's arithmetic (so its timing credits only work it did) and the whole-model bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lastbit
from lastbit.autotune.roofline import (
    CHAINS,
    MACS_PER_CHAIN_STEP,
    RooflineError,
    function_macs,
    model_kernel_macs,
    tuning_bound,
    vnni_chains,
)
from lastbit.codegen.kernels import IntLayer
from lastbit.codegen.kernels.common import layer_macs
from lastbit.squeeze import Squeeze
from tests.conftest import SmallCNN


def _torch_conv_macs(c, o, hw, k, stride, padding, groups) -> int:
    conv = torch.nn.Conv2d(c, o, k, stride=stride, padding=padding, groups=groups, bias=False)
    out = conv(torch.zeros(2, c, *hw))
    return out.numel() * (c // groups) * k * k


@pytest.mark.parametrize("c,o,hw,k,stride,padding,groups", [
    (3, 8, (9, 7), 3, 1, 1, 1), (16, 32, (14, 14), 3, 2, 1, 1), (8, 8, (10, 10), 3, 1, 0, 8),
    (6, 12, (5, 11), 1, 2, 0, 3)])
def test_layer_macs_counts_every_output_tap(c, o, hw, k, stride, padding, groups):
    layer = IntLayer(op="conv2d", code_set="pow2-4", bits=4, data_shape=(2, c, *hw),
                     weight_shape=(o, c // groups, k, k),
                     strides=(stride, stride), padding=(padding,) * 4, groups=groups)
    assert layer_macs(layer) == _torch_conv_macs(c, o, hw, k, stride, padding, groups)
    dense = IntLayer(op="dense", code_set="ternary", bits=2, data_shape=(5, 24), weight_shape=(7, 24))
    assert layer_macs(dense) == 5 * 24 * 7


def test_function_macs_names_each_integer_kernel_of_a_compiled_model():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    art = lastbit.compile(model, "x86_64-linux-gnu", (x,), squeeze=Squeeze(bits=3))
    macs = function_macs(art.mod)
    # conv1 3→8 and conv2 8→8 (3×3, 8×8 output), fc 128→10
    assert sorted(macs.values()) == sorted([8 * 64 * 3 * 9, 8 * 64 * 8 * 9, 128 * 10])
    assert all(art.mod[name] is not None for name in macs)
    assert model_kernel_macs(art.mod) == sum(macs.values())  # each layer called once


def _lane_dot(a_word: int, b_word: int) -> int:
    a = np.frombuffer(np.int32(a_word).tobytes(), np.uint8).astype(np.int64)
    b = np.frombuffer(np.int32(b_word).tobytes(), np.int8).astype(np.int64)
    return int(a @ b)


@pytest.mark.parametrize("a_word,b_word,iters", [(3, 5, 1000), (-2130771710, 2139160323, 7)])
def test_peak_loop_does_all_the_work_it_is_credited_with(a_word, b_word, iters):
    try:
        total = vnni_chains(iters, a_word, b_word)
    except RooflineError as err:
        pytest.skip(str(err))
    lanes = MACS_PER_CHAIN_STEP // 4
    # chain k starts at k in every lane and adds one 4-byte dot product per round; each chain's
    # lanes are summed in int32 (wrapping), the chains in int64
    per_chain = [np.int64(lanes * (k + iters * _lane_dot(a_word, b_word))) for k in range(CHAINS)]
    assert total == sum(int(np.int64(v).astype(np.int32)) for v in per_chain)


def test_tuning_bound_replaces_the_kernel_share_by_its_peak_time():
    bound = tuning_bound(model_ms=10.0, kernels_ms=8.0, macs=2_000_000_000, peak_gmacs=500.0)
    assert bound["kernels_at_peak_ms"] == pytest.approx(4.0)
    assert bound["kernel_fraction_of_peak"] == pytest.approx(0.5)
    assert bound["max_model_speedup"] == pytest.approx(10.0 / 6.0)
    with pytest.raises(RooflineError, match="kernels take 12"):
        tuning_bound(model_ms=10.0, kernels_ms=12.0, macs=1, peak_gmacs=1.0)


def test_tune_table_shows_each_integer_task_against_the_peak():
    from lastbit.autotune.tuner import TaskResult, TuneResult

    tasks = [TaskResult("conv", "int:int8-vnni-conv", 2, True, default_ms=2.0, best_ms=1.0, macs=1_000_000_000),
             TaskResult("pool", "generic", 1, False, default_ms=0.5, best_ms=0.5)]
    result = TuneResult("x86_64-linux-gnu", Path("db"), tasks)
    table = result.format_table(peak_gmacs=1000.0)
    assert "of peak" in table.splitlines()[0]
    assert "50% → 100%" in next(line for line in table.splitlines() if line.startswith("conv"))
    assert next(line for line in table.splitlines() if line.startswith("pool")).rstrip().endswith("-")
    assert "of peak" not in result.format_table()  # no peak, no column
    assert tasks[0].to_json()["macs"] == 1_000_000_000


def test_cli_measures_the_peak_only_for_integer_tasks_tuned_on_this_host():
    from lastbit.autotune.tuner import TaskResult, TuneResult
    from lastbit.cli import _host_peak_gmacs

    int_task = TaskResult("conv", "int:int8-vnni-conv", 1, True, 1.0, 1.0, macs=10)
    fp32_task = TaskResult("conv_fp32", "lastbit.conv2d_nchwc", 1, True, 1.0, 1.0)
    assert _host_peak_gmacs(TuneResult("aarch64-linux-gnu", Path("db"), [int_task])) is None
    assert _host_peak_gmacs(TuneResult("x86_64-linux-gnu", Path("db"), [fp32_task])) is None
    try:
        vnni_chains(10, 1, 1)
    except RooflineError:
        pytest.skip("no vpdpbusd peak on this host")
    assert _host_peak_gmacs(TuneResult("x86_64-linux-gnu", Path("db"), [int_task])) > 0

"""`make demo`'s core on a tiny budget: the table has its rows and the aarch64 check compares."""

import numpy as np
import pytest

from lastbit.demo import DemoConfig, compare_outputs, run_demo
from lastbit.targets import get_target


def test_compare_outputs_counts_only_bit_identical_outputs():
    images = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)

    def run(x):
        return x.reshape(1, -1) * np.float32(3)

    assert compare_outputs(run, run, images) == {"compared": 3, "identical": 3, "max_abs_diff": 0.0}
    one_ulp = compare_outputs(run, lambda x: np.nextafter(run(x), np.float32(np.inf)), images)
    assert one_ulp["identical"] == 0 and 0 < one_ulp["max_abs_diff"] < 1e-5
    as_float64 = compare_outputs(run, lambda x: run(x).astype(np.float64), images)
    assert as_float64["identical"] == 0 and as_float64["max_abs_diff"] == 0.0  # same values, other dtype


@pytest.mark.qemu
@pytest.mark.slow
def test_demo_table_on_a_tiny_budget(capsys):
    config = DemoConfig(pretrained=False, test_images=40, calibration_images=8, arm_images=2,
                        latency_repeat=3, photos=False)
    result = run_demo(config)
    assert list(result.rows) == ["fp32", "3-bit"]
    for row in result.rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_ms"] > 0 and row["compile_s"] > 0
    assert result.rows["3-bit"]["model_bytes"] * 4 < result.rows["fp32"]["model_bytes"]
    out = capsys.readouterr().out
    for label in ("test accuracy (40)", "model bytes", "latency, batch 1 (ms)", "aarch64-linux-gnu (qemu)"):
        assert label in out
    if get_target("aarch64-linux-gnu").missing_tools():
        assert "skipped" in result.arm
    else:  # the integer path gives the same bits under qemu-aarch64 as on this host
        assert result.arm["compared"] == 2 and result.arm["identical"] == 2
        assert "bit-identical to x86 on 2/2 test images" in out

"""``lastbit tune --target accel-sim``: offloaded layers' tilings measured on the timing
simulator (locally and through an accel-sim farm worker), the best applied by
``lastbit compile --db``, outputs bit-identical; wrong device/target pairs are one error."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lastbit
from lastbit.autotune.accel_tuning import TILINGS
from lastbit.autotune.database import target_dir
from lastbit.autotune.farm import LocalFarm
from lastbit.autotune.tuner import TuneError, tune_model
from lastbit.frontend.models import get_model
from lastbit.squeeze import Squeeze

TARGET = "accel-sim"


@pytest.fixture(scope="module")
def resnet8_q():
    module, x = get_model("resnet8", pretrained=False)
    return module, x, Squeeze(bits=3)


def _layer_cycles(artifact) -> dict:
    return {row["layer"]: row["cycles"] for row in artifact.report().accelerator["layers"]}


def test_tune_accel_then_compile_with_db_is_bit_exact(tmp_path, resnet8_q):
    module, x, squeeze = resnet8_q
    result = tune_model(module, TARGET, tmp_path, trials=24, example_inputs=(x,), squeeze=squeeze, progress=False)
    assert all(t.kind.startswith("accel:") and t.best_ms <= t.default_ms for t in result.tasks)
    assert result.unit == "Mcyc" and "simulated cycles" in result.measure
    improved = {t.name: t.best_ms * 1e6 for t in result.tasks if t.best_ms < t.default_ms}
    assert improved  # 24 simulated tilings beat the estimate's pick somewhere in ResNet-8
    records = json.loads((target_dir(tmp_path, TARGET) / TILINGS).read_text())["layers"]
    assert sorted(r["layer"] for r in records.values()) == sorted(improved)

    plain = lastbit.compile(module, TARGET, (x,), squeeze=squeeze)
    tuned = lastbit.compile(module, TARGET, (x,), squeeze=squeeze, db=tmp_path)
    before, after = _layer_cycles(plain), _layer_cycles(tuned)
    for name, cycles in improved.items():
        assert after[name] == round(cycles) < before[name]
    np.testing.assert_array_equal(tuned.run(x.numpy()), plain.run(x.numpy()))


def test_tune_accel_through_an_accel_sim_worker(tmp_path, resnet8_q):
    from lastbit.codegen.accel.tuner import start_server

    module, x, squeeze = resnet8_q
    with LocalFarm(workers=0, key="sim") as farm:
        server = start_server(port=9300, port_end=9400, tracker=farm.tracker, key="sim")
        try:
            farm.wait_for_workers(1)  # the accel-sim server registered
            result = tune_model(module, TARGET, tmp_path, trials=2, example_inputs=(x,), squeeze=squeeze,
                                progress=False, tracker=farm.tracker, key="sim")
        finally:
            server.terminate()
    assert result.stats.devices == {farm.tracker} and result.stats.measured >= len(result.tasks)


def test_wrong_device_for_the_target_is_one_error(tmp_path, resnet8_q):
    module, x, squeeze = resnet8_q
    with LocalFarm(workers=1, key="cpu", threads=1) as farm:
        with pytest.raises(TuneError, match="measure with 'host', which cannot measure an accelerator target"):
            tune_model(module, TARGET, tmp_path / "db", trials=2, example_inputs=(x,), squeeze=squeeze,
                       progress=False, tracker=farm.tracker, key="cpu")
    assert not (tmp_path / "db").exists()

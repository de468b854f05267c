"""Tuning ARM targets without a board: candidates counted under qemu-user and costed by the
cycle model (``autotune/qemu_device.py``), locally and through a farm worker of that kind;
the records apply at compile time, stay per target and keep the integer path bit-exact."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lastbit
from lastbit.autotune.database import MEASURE, RECORDS, apply_database, target_dir
from lastbit.autotune.farm import LocalFarm
from lastbit.autotune.tuner import TuneError, tune_model
from lastbit.cli import main as cli_main
from lastbit.squeeze import Squeeze
from lastbit.targets import get_target
from tests.conftest import SmallCNN

DOTPROD = "aarch64-dotprod-linux-gnu"
PLAIN = "aarch64-linux-gnu"

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = get_target(DOTPROD).missing_tools()
    if missing:
        pytest.skip(f"{DOTPROD} needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def small_cnn_q():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32"))
    return model, x, Squeeze(bits=3)


@pytest.fixture(scope="module")
def qemu_farm():
    with LocalFarm(workers=1, key="qemu-test", device="qemu-aarch64") as running:
        yield running


def _tune(model, x, squeeze, triple, db, **kwargs):
    return tune_model(model, triple, db, trials=3, per_round=2, example_inputs=(x,), squeeze=squeeze,
                      progress=False, integer_only=True, max_tasks=2, **kwargs)


def test_tune_on_qemu_then_compile_with_db_is_bit_exact(tmp_path, small_cnn_q, caplog):
    model, x, squeeze = small_cnn_q
    result = _tune(model, x, squeeze, DOTPROD, tmp_path)
    assert [t.kind for t in result.tasks] == ["int:int8-sdot"] * 2
    assert all(t.measured == 3 and t.failed == 0 and t.best_ms <= t.default_ms for t in result.tasks)
    assert result.unit == "Mcyc" and "cortex-a76 cycle model" in result.measure
    assert "not board time" in result.format_table()
    folder = target_dir(tmp_path, DOTPROD)
    assert len((folder / RECORDS).read_text().splitlines()) == 6  # no confirmation re-runs: deterministic
    assert "estimated cycles" in json.loads((folder / MEASURE).read_text())["measure"]

    plain = lastbit.compile(model, DOTPROD, (x,), squeeze=squeeze)
    with caplog.at_level(logging.INFO, logger="lastbit.autotune.database"):
        tuned = lastbit.compile(model, DOTPROD, (x,), squeeze=squeeze, db=tmp_path)
    assert sum("tuned schedule for" in r.getMessage() for r in caplog.records) == 2
    np.testing.assert_array_equal(tuned.run(x), plain.run(x))

    # the records are the dot-product target's: plain aarch64 (and x86) find none
    from lastbit.pipeline import import_model, integer_lowering, lower, squeeze_passes

    for triple in (PLAIN, "x86_64-linux-gnu"):
        target = get_target(triple)
        graph = import_model(model, (x,))
        for squeeze_pass in squeeze_passes(squeeze, model, target):
            graph = squeeze_pass(graph)
        lowered = lower(graph, target, integer=integer_lowering(target, squeeze))
        assert apply_database(lowered, tmp_path, target) is lowered


def test_tune_through_a_qemu_worker_of_a_farm(tmp_path, small_cnn_q, qemu_farm):
    model, x, squeeze = small_cnn_q
    result = _tune(model, x, squeeze, PLAIN, tmp_path, tracker=qemu_farm.tracker, key=qemu_farm.key)
    # conv2 on int16 partial sums; conv1 keeps int8 codes (keep_first_last): reference-int, no knobs
    assert [t.kind for t in result.tasks] == ["int:int8-smlal", "int:reference-int"]
    assert [t.measured for t in result.tasks] == [3, 1] and all(t.best_ms for t in result.tasks)
    assert result.stats.measured == 4 and result.stats.failed == 0 and "cortex-a53" in result.measure


@pytest.mark.parametrize("triple", ["x86_64-linux-gnu", "armv7a-linux-gnueabihf"])
def test_a_qemu_worker_refuses_a_target_it_cannot_run(tmp_path, small_cnn_q, qemu_farm, triple):
    model, x, squeeze = small_cnn_q
    with pytest.raises(TuneError, match=f"'qemu-aarch64', which cannot measure target '{triple}'"):
        _tune(model, x, squeeze, triple, tmp_path / "db", tracker=qemu_farm.tracker, key=qemu_farm.key)
    assert not (tmp_path / "db").exists()


def test_board_time_and_model_estimates_do_not_mix(tmp_path, small_cnn_q):
    model, x, squeeze = small_cnn_q
    folder = target_dir(tmp_path, DOTPROD)
    folder.mkdir(parents=True)
    (folder / MEASURE).write_text(json.dumps({"target": DOTPROD, "measure": "board time"}))
    with pytest.raises(TuneError, match="holds board time"):
        _tune(model, x, squeeze, DOTPROD, tmp_path, resume=True)


def test_cli_worker_names_the_devices_it_knows():
    out = CliRunner().invoke(cli_main, ["farm", "worker", "--tracker", "127.0.0.1:1", "--key", "k",
                                        "--device", "qemu-riscv"])
    assert out.exit_code == 2 and "qemu-aarch64" in out.output and "accel-sim" in out.output

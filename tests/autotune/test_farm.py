"""The farm on loopback: devices listed per key, measurements spread over all of them, and
every fault the issue names (dead worker, hanging / crashing kernel, tracker restart)."""

from __future__ import annotations

import threading

import pytest
from autotune_helpers import build_artifact, crash_kernel, spin_kernel

from lastbit.autotune.farm import FarmError, LocalFarm, farm_status, free_port
from lastbit.autotune.runner import FarmRunner


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels")
    return {
        "quick": build_artifact(spin_kernel(10**5), tmp, "quick"),
        "slow": build_artifact(spin_kernel(2 * 10**8), tmp, "slow"),  # ~1 s per run here
        "long": build_artifact(spin_kernel(15 * 10**8), tmp, "long"),  # ~8 s: surely mid-run when killed
        "hang": build_artifact(spin_kernel(1 << 62), tmp, "hang"),
        "crash": build_artifact(crash_kernel(), tmp, "crash"),
    }


def test_status_lists_devices_per_key(farm):
    (row,) = [r for r in farm_status(farm.host, farm.port) if r.key == "test"]
    assert len(row.servers) == 2 and all(s.startswith("127.0.0.1:") for s in row.servers)


def test_unreachable_tracker_is_one_clear_error():
    port = free_port()
    with pytest.raises(FarmError, match=f"127.0.0.1:{port}"):
        FarmRunner("127.0.0.1", port, "test")


def test_measurements_use_every_device(farm, artifacts):
    runner = FarmRunner(farm.host, farm.port, farm.key, timeout_s=20, number=1, repeat=1, min_repeat_ms=0)
    results = runner.measure([artifacts["slow"]] * 4)
    assert all(r.ok for r in results)
    assert len({r.device for r in results}) == 2  # both workers measured, at the same time


def test_hanging_and_crashing_kernels_fail_and_tuning_goes_on(farm, artifacts):
    runner = FarmRunner(farm.host, farm.port, farm.key, timeout_s=3, number=1, repeat=2, min_repeat_ms=0)
    quick, hang, crash = artifacts["quick"], artifacts["hang"], artifacts["crash"]
    results = runner.measure([quick, hang, crash, quick, quick])
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert results[1].timed_out and "timeout" in results[1].error
    assert not results[2].timed_out and results[2].attempts == 2  # retried once, then marked failed
    # The crash took its servers down; they restart and re-register, and the farm measures again.
    farm.wait_for_workers(2, timeout_s=90)
    assert all(r.ok for r in runner.measure([quick, quick]))


@pytest.mark.slow
def test_worker_killed_mid_measurement_is_retried_elsewhere(artifacts):
    with LocalFarm(workers=2, key="kill", threads=1) as own:
        runner = FarmRunner(own.host, own.port, own.key, timeout_s=30, number=1, repeat=1, min_repeat_ms=0)
        victims = []

        def on_result(index, measurement):
            # The first quick candidate finished on one device; the other has taken the ~8 s
            # one. Kill it a second later, when its session is surely set up and measuring.
            if not victims:
                other = [d for d in _devices(own) if d != measurement.device]
                victims.extend(other)
                threading.Timer(1.0, own.kill_device, args=(other[0],)).start()

        quick, long = artifacts["quick"], artifacts["long"]
        results = runner.measure([quick, long, quick, quick], on_result=on_result)
        assert victims, "no result arrived"
        assert all(r.ok for r in results), [r.error for r in results]
        # Lost mid-measurement (retried) or while its session was opening (requeued): either
        # way the candidate moved to the surviving device.
        assert runner.stats.retried + runner.stats.requeued >= 1, runner.stats
        assert results[1].device != victims[0]  # the long candidate finished on the survivor


def _devices(farm) -> list[str]:
    (row,) = [r for r in farm_status(farm.host, farm.port) if r.key == farm.key]
    return list(row.servers)


@pytest.mark.slow
def test_tracker_restart_pauses_the_run_then_it_resumes(artifacts):
    with LocalFarm(workers=1, key="restart", threads=1) as own:
        runner = FarmRunner(own.host, own.port, own.key, timeout_s=30, number=1, repeat=1, min_repeat_ms=0,
                            tracker_wait_s=90)
        restarted = threading.Event()

        def on_result(index, measurement):
            if not restarted.is_set():
                restarted.set()
                threading.Thread(target=own.restart_tracker, kwargs={"down_s": 1.0}).start()

        results = runner.measure([artifacts["slow"]] * 3, on_result=on_result)
        assert restarted.is_set() and all(r.ok for r in results)
        assert runner.stats.tracker_reconnects >= 1
        own.wait_for_workers(1)  # the worker re-registered with the new tracker


def test_farm_docs_never_advise_binding_rpc_to_every_interface():
    """TVM RPC runs uploaded libraries without authentication: docs/AUTOTUNE.md and the CLI
    help must not tell users to bind to 0.0.0.0, and must show the safe set-ups."""
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from lastbit.cli import main

    doc = (Path(__file__).resolve().parents[2] / "docs" / "AUTOTUNE.md").read_text()
    assert not re.search(r"--host\s+0\.0\.0\.0", doc)
    assert "no authentication" in doc and "ssh -N -L 9190:127.0.0.1:9190 -R" in doc and "private network" in doc
    for command in (["farm", "tracker", "--help"], ["farm", "worker", "--help"]):
        help_text = CliRunner().invoke(main, command).output
        assert "authentication" in help_text and "0.0.0.0 to serve" not in help_text

"""Tiling search with the simulator as the measuring device, in process and over TVM RPC."""

import numpy as np
import pytest

from lastbit.codegen.accel import preset
from lastbit.codegen.accel.compiler import (
    ConvLayer,
    compile_layer,
    estimate_cost,
    tiling_candidates,
)
from lastbit.codegen.accel.isa import encode
from lastbit.codegen.accel.timing_sim import simulate_timing
from lastbit.codegen.accel.tuner import measure_cycles, start_server, tune_layer

LAYER = ConvLayer("conv", 1, 32, 14, 14, 48, (3, 3), (1, 1), (1, 1, 1, 1), True)
CODES = np.ones((48, 32, 3, 3), np.int8)


def test_tuner_keeps_the_fastest_measured_tiling():
    cfg = preset("small")
    result = tune_layer(LAYER, CODES, cfg, trials=6)
    assert len(result.trials) == 6
    assert result.cycles == min(cycles for _, cycles in result.trials)
    best_estimated = min(tiling_candidates(LAYER, cfg), key=lambda t: estimate_cost(LAYER, cfg, t))
    first = compile_layer(LAYER, CODES, cfg, best_estimated)
    assert result.cycles <= simulate_timing(first.instructions, cfg).cycles
    assert result.program.tiling in [t for t, _ in result.trials]


def test_encoded_programs_measure_the_same_as_the_simulator():
    cfg = preset("small")
    program = compile_layer(LAYER, CODES, cfg)
    words = encode(program.instructions).tobytes()
    import json

    assert measure_cycles(words, json.dumps(cfg.to_json())) == simulate_timing(program.instructions, cfg).cycles


@pytest.mark.slow
def test_an_rpc_server_serves_as_the_measuring_device():
    from tvm import rpc

    server = start_server(port=19300, port_end=19400)
    try:
        session = rpc.connect("127.0.0.1", server.port, key="accel-sim")
        remote = tune_layer(LAYER, CODES, preset("small"), trials=3, session=session)
    finally:
        server.terminate()
    local = tune_layer(LAYER, CODES, preset("small"), trials=3)
    assert remote.trials == local.trials


@pytest.mark.slow
def test_farm_worker_for_the_simulator_registers_and_measures():
    """`lastbit farm worker --device accel-sim` joins a tracker; a tuner reaches it by key."""
    import subprocess
    import sys
    import time

    from tvm import rpc

    from lastbit.autotune.farm import LocalFarm, farm_status, free_port

    with LocalFarm(workers=0, key="unused") as farm:
        port = free_port()
        cmd = [sys.executable, "-m", "lastbit.cli", "farm", "worker", "--tracker", farm.tracker,
               "--key", "accel-sim", "--device", "accel-sim", "--port", str(port)]
        worker = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(row.key == "accel-sim" and row.servers for row in farm_status(farm.host, farm.port)):
                    break
                assert worker.poll() is None, worker.stderr.read().decode()
                time.sleep(0.5)
            else:
                pytest.fail("the accel-sim worker never registered")
            session = rpc.connect_tracker(farm.host, farm.port).request("accel-sim", session_timeout=60)
            remote = tune_layer(LAYER, CODES, preset("small"), trials=2, session=session)
        finally:
            import os
            import signal

            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=10)
    assert remote.trials == tune_layer(LAYER, CODES, preset("small"), trials=2).trials

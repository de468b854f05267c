"""Search a layer's tiling knobs with the simulator as the measuring device, locally or
through TVM RPC.

The estimate in compiler.py ranks every tiling the buffers hold; the tuner compiles the
``trials`` best-ranked ones and measures each on the cycle model. The measurement is a
packed function, ``lastbit.accel_sim.measure_cycles(program_words: bytes, config_json: str)``,
registered when this module is imported and in every server :func:`start_server` starts
(``python -m lastbit.codegen.accel.tuner --port P [--tracker H:P --key accel-sim]``), so
such a server is an accelerator "device" for a tuner:
``tune_layer(..., session=tvm.rpc.connect(H, P))`` (or a tracker session).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np

from lastbit.codegen.accel.compiler import (
    AccelCompileError,
    AccelProgram,
    ConvLayer,
    Tiling,
    compile_layer,
    estimate_cost,
    tiling_candidates,
)
from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.isa import decode, encode
from lastbit.codegen.accel.timing_sim import simulate_timing

log = logging.getLogger(__name__)

__all__ = ["MEASURE_FUNC", "TuneResult", "measure_cycles", "serve_forever", "start_server", "tune_layer"]

MEASURE_FUNC = "lastbit.accel_sim.measure_cycles"


def measure_cycles(program_words: bytes, config_json: str) -> int:
    """Cycles of an encoded program (``isa.encode(...).tobytes()``) on the config given as JSON."""
    config = AccelConfig(**json.loads(config_json))
    program = decode(np.frombuffer(program_words, dtype=np.uint64).reshape(-1, 2))
    return int(simulate_timing(program, config).cycles)


def _register() -> None:
    import tvm

    def packed(program_words, config_json):
        return measure_cycles(bytes(program_words), str(config_json))

    tvm.register_global_func(MEASURE_FUNC, packed, override=True)
    from lastbit.autotune.farm import DEVICE_KIND_FUNC  # tells the tuner what this worker measures with

    tvm.register_global_func(DEVICE_KIND_FUNC, lambda: "accel-sim", override=True)


@dataclass
class TuneResult:
    """The best program found and every (tiling, measured cycles) pair tried, in order."""

    program: AccelProgram
    cycles: int
    trials: list[tuple[Tiling, int]] = field(default_factory=list)


def tune_layer(layer: ConvLayer, codes: np.ndarray, config: AccelConfig, trials: int = 8, session=None) -> TuneResult:
    """Measure the ``trials`` best-estimated tilings and keep the fastest.

    ``session``: a TVM RPC session (``tvm.rpc.connect`` / ``tvm.rpc.LocalSession()``) whose
    process registered :data:`MEASURE_FUNC`; None measures in this process."""
    ranked = sorted(tiling_candidates(layer, config), key=lambda t: estimate_cost(layer, config, t))
    if not ranked:
        raise AccelCompileError(f"{layer.name}: no tiling fits accelerator '{config.name}'")
    if session is not None:
        remote = session.get_function(MEASURE_FUNC)

        def measure(program: AccelProgram) -> int:
            return int(remote(bytearray(encode(program.instructions).tobytes()), json.dumps(config.to_json())))
    else:
        def measure(program: AccelProgram) -> int:
            return int(simulate_timing(program.instructions, config).cycles)

    best, tried = None, []
    for tiling in ranked[:max(1, trials)]:
        program = compile_layer(layer, codes, config, tiling)
        cycles = measure(program)
        tried.append((tiling, cycles))
        if best is None or cycles < best[1]:
            best = (program, cycles)
    log.info("%s: %d tilings measured, best %s at %d cycles", layer.name, len(tried), best[0].tiling, best[1])
    return TuneResult(best[0], best[1], tried)


try:  # importing this module makes the process a measuring device
    _register()
except ImportError:  # pragma: no cover - tvm is a hard dependency; keep the numpy part usable
    log.debug("tvm not importable: %s not registered", MEASURE_FUNC)


def start_server(host: str = "127.0.0.1", port: int = 9091, port_end: int = 9199, tracker: str | None = None,
                 key: str = "accel-sim"):
    """A TVM RPC server (``tvm.rpc.Server``) whose serving processes can measure programs.

    The server runs in a fresh worker process; ``server_init_callback`` registers the
    measuring function there before it forks a process per session."""
    from tvm import rpc

    tracker_addr = None
    if tracker:
        h, _, p = tracker.rpartition(":")
        tracker_addr = (h or "127.0.0.1", int(p))
    return rpc.Server(host=host, port=port, port_end=port_end, tracker_addr=tracker_addr, key=key,
                      server_init_callback=_register)


def serve_forever(host: str, port: int, tracker: str | None, key: str = "accel-sim", port_end: int | None = None) -> None:
    """Run :func:`start_server` until interrupted (``lastbit farm worker --device accel-sim``)."""
    import time

    server = start_server(host, port, port_end or port + 100, tracker, key)
    log.warning("accel-sim measuring server on %s:%d (key %s)", server.host, server.port, key)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.terminate()


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="serve accelerator-program measurements over TVM RPC")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9091)
    parser.add_argument("--port-end", type=int, default=9199)
    parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker to register with")
    parser.add_argument("--key", default="accel-sim")
    args = parser.parse_args(argv)
    serve_forever(args.host, args.port, args.tracker, args.key, args.port_end)


if __name__ == "__main__":
    _main()

"""``lastbit tune`` for accelerator targets (runner "sim"): each offloaded layer's tiling
measured on the timing simulator, the best kept in the tuning database.

Without a database the compiler picks each layer's tiling with its closed-form estimate
(``codegen/accel/compiler.choose_tiling``).  Tuning compiles the ``trials`` best-estimated
tilings of every layer the model offloads and measures each on the cycle simulator
(``codegen/accel/tuner.tune_layer``) — in this process, or on a farm worker started with
``lastbit farm worker --device accel-sim`` — against the default's simulated cycles.
A layer whose best beats its default gets a record in ``DIR/<triple>/accel_tilings.json``
keyed by the compiled layer's geometry, which ``lastbit compile --db`` passes to the
offload (:func:`load_tilings`).  Tilings change the instruction stream's order and
blocking, never the arithmetic, so outputs stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from lastbit.fileio import atomic_write_json

log = logging.getLogger(__name__)

TILINGS = "accel_tilings.json"
MEASURE = "simulated cycles (accelerator timing simulator)"
DEVICE = "accel-sim"


def layer_key(layer) -> str:
    """A compiled layer's identity in the database: its geometry, not its name (two layers
    of the same shape share a record)."""
    fields = {k: v for k, v in dataclasses.asdict(layer).items() if k != "name"}
    return json.dumps(fields, sort_keys=True)


def load_tilings(db_dir: "str | Path | None", target) -> dict:
    """{layer_key: Tiling} of ``target``'s records under ``db_dir`` ({} when none)."""
    from lastbit.autotune.database import target_dir
    from lastbit.codegen.accel.compiler import Tiling

    if db_dir is None:
        return {}
    path = target_dir(db_dir, target.triple) / TILINGS
    if not path.is_file():
        log.warning("tuning database %s has no accelerator tilings for %s; using the estimate's", db_dir,
                    target.triple)
        return {}
    layers = json.loads(path.read_text()).get("layers", {})
    return {key: Tiling(**record["tiling"]) for key, record in layers.items()}


def _session(tracker: str, key: str):
    """A session on an accel-sim worker of ``key``; one clear error for any other device."""
    from lastbit.autotune.farm import DEVICE_KIND_FUNC, HOST_DEVICE, FarmError, connect_tracker, parse_address
    from lastbit.autotune.tuner import TuneError

    host, port = parse_address(tracker)
    try:
        session = connect_tracker(host, port, timeout_s=5.0).request(key, session_timeout=600)
    except FarmError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises a bare RuntimeError
        raise FarmError(f"no worker with key '{key}' at tracker {tracker}: {err}") from None
    try:
        device = str(session.get_function(DEVICE_KIND_FUNC)())
    except Exception:  # noqa: BLE001 - a stock server
        device = HOST_DEVICE
    if device != DEVICE:
        raise TuneError(f"the workers of key '{key}' at {tracker} measure with '{device}', which cannot measure "
                        f"an accelerator target: start workers with --device {DEVICE}")
    return session


def tune_accel(graph, target, db_dir: "str | Path", *, trials: int, tracker: str | None = None,
               key: str | None = None, resume: bool = False) -> "TuneResult":  # noqa: F821
    """Tune the tilings of every layer ``graph`` (squeezed) offloads to ``target``'s
    accelerator; records go to ``db_dir``. Returns the tuner's summary (unit Mcyc)."""
    import numpy as np

    from lastbit.autotune.database import target_dir
    from lastbit.autotune.runner import MeasureStats
    from lastbit.autotune.tuner import TaskResult, TuneError, TuneResult
    from lastbit.codegen.accel import config_for_target
    from lastbit.codegen.accel.dse import digit_planes
    from lastbit.codegen.accel.offload import offload_to_accelerator
    from lastbit.codegen.accel.tuner import tune_layer

    start = time.monotonic()
    folder = target_dir(db_dir, target.triple)
    path = folder / TILINGS
    if path.is_file() and not resume:
        raise TuneError(f"tuning database {folder} already holds tilings for {target.triple}; "
                        f"pass resume=True (--resume) to continue it or choose another directory")
    session = _session(tracker, key or DEVICE) if tracker else None
    config = config_for_target(target.triple)
    _, accel = offload_to_accelerator(graph, config)
    records = json.loads(path.read_text()).get("layers", {}) if path.is_file() else {}
    tasks, stats = [], MeasureStats()
    for layer in accel.layers:
        program = layer.program
        codes = digit_planes(layer.codes, layer.terms) if layer.terms > 1 else layer.codes
        default = int(layer.timing.cycles)
        found = tune_layer(program.layer, np.asarray(codes, np.int8), config, trials=trials, session=session)
        stats.measured += len(found.trials)
        best = min(default, found.cycles)
        if found.cycles < default:
            records[layer_key(program.layer)] = {"layer": layer.name, "tiling": dataclasses.asdict(found.program.tiling),
                                                 "cycles": found.cycles, "default_cycles": default}
        tasks.append(TaskResult(layer.name, f"accel:{layer.kind}", 1, True, default / 1e6, best / 1e6,
                                measured=len(found.trials)))
        log.info("accel layer %s: default %d cycles, tuned %d", layer.name, default, best)
    if session is not None:
        stats.devices.add(tracker)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"target": target.triple, "config": config.name, "measure": MEASURE, "layers": records})
    return TuneResult(target.triple, folder, tasks, stats, time.monotonic() - start, MEASURE)

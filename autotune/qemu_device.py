"""A measuring device for ARM targets without a board: a candidate's estimated cycles from its
instructions counted under qemu-user and the cycle model of the target's core.

The tuning machine builds each candidate into a one-step bundle (:func:`build_candidate`:
the scheduled PrimFunc behind a Relax ``main``, cross-compiled with the bundle's C runner,
packed into one tar file); the device unpacks it, counts its instructions per call under
qemu (``codegen/qemu_count.count_bundle``: start-up cancels out) and costs them with the
per-instruction-class model of ``targets/arm_cycle_model.py`` (:func:`measure_archive`).
The result reaches MetaSchedule as a run time at a nominal :data:`CLOCK_HZ`, so one
"millisecond" is one million estimated cycles. **A model estimate, not board time**: it
ranks candidates by the work they issue and ignores stalls, caches and branch misses.

The same function serves locally (the tuner's private loopback farm) and on a farm:
``lastbit farm worker --device qemu-aarch64`` registers :data:`MEASURE_FUNC` in its RPC
server (``autotune/farm.py``), and the tuner calls it with the archive's bytes.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from lastbit.errors import TargetError

log = logging.getLogger(__name__)

MEASURE_FUNC = "lastbit.qemu.measure_cycles"
CLOCK_HZ = 1e9  # nominal: the run time MetaSchedule sees is cycles / CLOCK_HZ (1 ms = 1M cycles)
INPUT_SEED = 0  # candidates of one task run on the same inputs


def device_name(qemu: str) -> str:
    """The farm device kind of a qemu-user binary (``qemu-aarch64`` -> ``qemu-aarch64``)."""
    return qemu


def qemu_devices() -> list[str]:
    """Device kinds of every registered qemu target (``lastbit farm worker --device``)."""
    from lastbit.targets import list_targets

    return sorted({device_name(t.qemu) for t in list_targets() if t.runner == "qemu" and t.qemu})


def cycle_core(target) -> str:
    """The core whose cycle model costs ``target``'s code: the core qemu emulates when the model
    has it, else the in-order Cortex-A53 (armv7 is costed on the A53's tables)."""
    from lastbit.targets import get_target
    from lastbit.targets.arm_cycle_model import CORES

    t = get_target(target)
    return t.qemu_cpu if t.qemu_cpu in CORES else "cortex-a53"


def candidate_module(prim_mod) -> "tvm.IRModule":  # noqa: F821
    """A Relax module whose ``main`` calls the workload's scheduled ``main`` once: every
    argument but the last is an input, the last is the output (destination passing)."""
    import tvm
    from tvm import relax
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    func = prim_mod["main"]
    types = [relax.TensorType([int(d) for d in a.shape], str(a.dtype)) for a in ArgInfo.from_prim_func(func)]
    bb = relax.BlockBuilder()
    params = [relax.Var(f"arg_{i}", ty) for i, ty in enumerate(types[:-1])]
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(func.with_attr("global_symbol", "candidate"), "candidate")
            out = bb.emit_output(bb.emit(relax.call_tir(gv, relax.Tuple(params), out_ty=types[-1])))
        bb.emit_func_output(out)
    mod = bb.get()
    return tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)


def build_candidate(prim_mod, triple: str, out_dir: str) -> str:
    """Popen-worker body (``runner.CandidateBuilder``): the scheduled workload as a bundle for
    ``triple``, packed into a .tar in ``out_dir``; returns its path."""
    from lastbit.autotune.tasks import load_cpu_tensor_intrinsics
    from lastbit.codegen.bundle import build_bundle

    load_cpu_tensor_intrinsics()
    # TVM's pool workers log at INFO: one "bundle written" line per candidate is noise here
    logging.getLogger("lastbit.codegen.bundle").setLevel(logging.WARNING)
    fd, path = tempfile.mkstemp(suffix=".tar", dir=out_dir)
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="lastbit-cand-", dir=out_dir) as tmp:
        bundle = build_bundle(candidate_module(prim_mod), triple, Path(tmp) / "bundle", name="candidate")
        with tarfile.open(path, "w") as archive:
            for item in sorted(bundle.iterdir()):
                archive.add(item, arcname=item.name)
    return path


def _inputs(manifest: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(INPUT_SEED)
    arrays = []
    for spec in manifest["inputs"]:
        dtype = np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            values = rng.integers(max(info.min, -128), min(info.max, 127) + 1, size=spec["shape"])
        else:
            values = rng.standard_normal(spec["shape"])
        arrays.append(np.ascontiguousarray(values.astype(dtype)))
    return arrays


def measure_archive(archive: bytes, triple: str, device: str | None = None) -> float:
    """Estimated cycles of one call of the candidate in ``archive`` (from
    :func:`build_candidate`) on the cycle model of ``triple``'s core. ``device``: the qemu
    binary this worker serves (a farm worker), checked against the target's."""
    from lastbit.codegen.bundle import load_manifest
    from lastbit.codegen.qemu_count import count_bundle
    from lastbit.targets import get_target

    target = get_target(triple)
    if target.runner != "qemu":
        raise TargetError(f"a qemu device measures targets run under qemu-user; '{triple}' runs on '{target.runner}'")
    if device is not None and device != device_name(target.qemu):
        raise TargetError(f"this worker is a {device} device; target '{triple}' needs {device_name(target.qemu)}")
    missing = target.missing_tools()
    if target.qemu in missing:
        raise TargetError(f"qemu device for '{triple}': {target.qemu} is not on PATH "
                          f"(Debian packages: {' '.join(target.apt_packages)})")
    with tempfile.TemporaryDirectory(prefix="lastbit-qemu-dev-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        counts = count_bundle(Path(tmp), _inputs(load_manifest(tmp)))
    cycles = float(counts.cycles(cycle_core(target)))
    log.info("candidate for %s: %d instructions, %.0f estimated cycles (%s)", triple, counts.total, cycles,
             cycle_core(target))
    return cycles


def register(device: str | None = None) -> None:
    """Make this process a qemu measuring device: register :data:`MEASURE_FUNC`
    ``(archive bytes, triple) -> estimated cycles`` for RPC sessions forked from it."""
    import tvm

    def packed(archive, triple):
        return measure_archive(bytes(archive), str(triple), device)

    tvm.register_global_func(MEASURE_FUNC, packed, override=True)

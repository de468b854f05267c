"""Build candidates on this machine and measure them on every free device of a farm key at
once, surviving dead devices, crashing kernels and a tracker restart.

MetaSchedule's ``RPCRunner`` opens one session per candidate from a pool that defaults to a
single worker, so N devices measure no faster than one, and a device that dies fails the
candidate it held.  :class:`FarmRunner` keeps one measuring thread per registered device
of the key (each asks the tracker for a session per candidate, so the tracker hands every
thread a different free device) and classifies what goes wrong:

* the session times out (the server kills it after ``timeout_s``: a hanging kernel) —
  recorded as failed, not retried;
* the connection drops (the device died, or the kernel crashed its server) — retried on a
  fresh session, which the tracker gives to any live device, up to ``max_attempts``; a
  candidate that kills every device it runs on is then recorded as failed;
* the tracker cannot be reached — requests are retried until ``tracker_wait_s`` has passed,
  so a tracker restart only pauses the run (the workers re-register by themselves).
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lastbit.autotune.farm import FarmError, connect_tracker, free_workers

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """The outcome of one candidate: ``run_secs`` on success, else ``error``."""

    run_secs: list[float] | None = None
    error: str | None = None
    timed_out: bool = False
    attempts: int = 0
    device: str = ""  # host:port of the server that produced the result

    @property
    def ok(self) -> bool:
        return self.run_secs is not None

    @property
    def latency_ms(self) -> float | None:
        """Median of the repeats in ms (see ``database.latency_s``), None when it failed."""
        from lastbit.autotune.database import latency_s

        return None if not self.run_secs else latency_s(self.run_secs) * 1e3


@dataclass
class MeasureStats:
    """Counters of one runner's lifetime (the tuner's summary shows them)."""

    measured: int = 0
    failed: int = 0
    timed_out: int = 0
    retried: int = 0  # lost their device mid-measurement and went to another
    requeued: int = 0  # their device vanished before the session opened
    tracker_reconnects: int = 0
    devices: set = field(default_factory=set)


# -- building ---------------------------------------------------------------------------------


def _build_one(mod, target, cc: str | None, out_dir: str) -> str:
    """Popen-worker body: compile one scheduled workload and link it as a shared library
    the device can ``dlopen`` (no compiler needed there, unlike MetaSchedule's .tar)."""
    import tvm

    from lastbit.autotune.tasks import load_cpu_tensor_intrinsics

    load_cpu_tensor_intrinsics()
    lib = tvm.tirx.build(mod, target=target)
    fd, path = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    lib.export_library(path, cc=cc) if cc else lib.export_library(path)
    return path


class CandidateBuilder:
    """Compiles candidates in a pool of ``workers`` processes with a per-build time-out.

    The pool outlives the builder (one per process and settings): each worker imports TVM
    once, not once per batch as MetaSchedule's ``LocalBuilder`` does, and not once per
    tuning run either.
    """

    _pools: dict = {}

    def __init__(self, target, cc: str | None = None, workers: int = 2, timeout_s: float = 120.0,
                 bundle_for: str | None = None) -> None:
        """``bundle_for``: a target triple to build each candidate as a one-step bundle for
        (a .tar, ``autotune/qemu_device.py``) instead of a shared library for TVM's RPC."""
        self.target = target
        self.cc = cc
        self.bundle_for = bundle_for
        self.timeout_s = timeout_s
        self.out_dir = tempfile.mkdtemp(prefix="lastbit-tune-")
        self._workers = workers

    def _pool(self):
        key = (self._workers, self.timeout_s)
        if key not in CandidateBuilder._pools:
            from tvm.support.popen_pool import PopenPoolExecutor

            CandidateBuilder._pools[key] = PopenPoolExecutor(max_workers=self._workers, timeout=self.timeout_s)
        return CandidateBuilder._pools[key]

    def build(self, mods: list) -> list[tuple[str | None, str | None]]:
        """(artifact path, None) or (None, error) per module, in order."""
        pool = self._pool()
        if self.bundle_for:
            from lastbit.autotune.qemu_device import build_candidate

            futures = [pool.submit(build_candidate, mod, self.bundle_for, self.out_dir) for mod in mods]
        else:
            futures = [pool.submit(_build_one, mod, self.target, self.cc, self.out_dir) for mod in mods]
        results = []
        for future in futures:
            try:
                results.append((future.result(), None))
            except Exception as err:  # compile error, or the pool's time-out
                results.append((None, f"build failed: {_first_line(err)}"))
        return results

    def close(self) -> None:
        """Remove this builder's artifacts (the pool stays for the next run)."""
        import shutil

        shutil.rmtree(self.out_dir, ignore_errors=True)


# -- measuring --------------------------------------------------------------------------------


@dataclass
class _Job:
    index: int
    artifact: str
    args_info: list
    attempts: int = 0  # sessions the candidate ran in
    requeues: int = 0  # sessions refused before it ran


class FarmRunner:
    """Measures built candidates on all registered devices of ``key`` at the tracker.

    ``number`` / ``repeat`` / ``min_repeat_ms`` are TVM's time_evaluator settings;
    ``parallel`` fixes the number of measuring threads (default: the devices registered
    for the key when a batch starts).  ``qemu_triple`` measures on qemu devices instead
    (``autotune/qemu_device.py``): the artifacts are candidate bundles, each device returns
    its estimated cycles, and the run time is cycles / ``CLOCK_HZ``, one value, deterministic.
    """

    def __init__(self, tracker_host: str, tracker_port: int, key: str, *, timeout_s: float = 10.0,
                 number: int = 3, repeat: int = 5, min_repeat_ms: int = 10, max_attempts: int = 2,
                 tracker_wait_s: float = 60.0, parallel: int | None = None, device: str = "cpu",
                 qemu_triple: str | None = None) -> None:
        self.host, self.port, self.key = tracker_host, tracker_port, key
        self.timeout_s = timeout_s
        self.number, self.repeat, self.min_repeat_ms = number, repeat, min_repeat_ms
        self.max_attempts = max_attempts
        self.tracker_wait_s = tracker_wait_s
        self.parallel = parallel
        self.device = device
        self.qemu_triple = qemu_triple
        self.stats = MeasureStats()
        self._lock = threading.Lock()
        # Check the tracker now: an unreachable one is a clear error before anything runs.
        connect_tracker(self.host, self.port, timeout_s=5.0)

    @property
    def deterministic(self) -> bool:
        """Whether measuring a candidate again gives the same number (a cycle model does)."""
        return self.qemu_triple is not None

    def device_kind(self) -> str:
        """What the key's workers measure with (``farm.worker_devices``), asked of one of them;
        a stock TVM server (no lastbit) is a host device."""
        from lastbit.autotune.farm import DEVICE_KIND_FUNC, HOST_DEVICE

        self.devices()  # waits for one, or one clear FarmError
        tracker = self._tracker_session()
        try:
            session, _ = self._request(tracker)
        except (_TrackerDown, _DeviceGone) as err:
            raise FarmError(f"cannot open a session on a worker of key '{self.key}': {err}") from None
        try:
            return str(session.get_function(DEVICE_KIND_FUNC)())
        except Exception:  # noqa: BLE001 - the function is missing: not a lastbit worker
            return HOST_DEVICE
        finally:
            del session
            tracker.close()

    def devices(self) -> int:
        """Registered devices of our key, waiting up to ``tracker_wait_s`` for at least one."""
        deadline = time.monotonic() + self.tracker_wait_s
        while True:
            try:
                count = free_workers(self.host, self.port, self.key)
            except FarmError:
                count = 0
            if count > 0:
                return count
            if time.monotonic() >= deadline:
                raise FarmError(f"no worker with key '{self.key}' at tracker {self.host}:{self.port} "
                                f"after {self.tracker_wait_s:.0f} s")
            time.sleep(0.5)

    def measure(self, artifacts: list[tuple[str, list]], on_result: Callable[[int, Measurement], None] | None = None,
                count: bool = True) -> list[Measurement]:
        """Measure each (artifact path, args_info as JSON) pair; ``on_result(i, m)`` is called
        as results arrive (from measuring threads, one at a time).  ``count=False`` keeps
        these runs out of ``stats`` (re-measurements, not candidates)."""
        if not artifacts:
            return []
        results: list[Measurement | None] = [None] * len(artifacts)
        jobs: queue.Queue = queue.Queue()
        for i, (path, args_info) in enumerate(artifacts):
            jobs.put(_Job(i, path, args_info))
        remaining = [len(artifacts)]
        threads = min(len(artifacts), self.parallel or self.devices())

        def finish(job: _Job, result: Measurement) -> None:
            with self._lock:
                result.attempts = job.attempts
                results[job.index] = result
                remaining[0] -= 1
                if not count:
                    pass
                elif result.ok:
                    self.stats.measured += 1
                else:
                    self.stats.failed += 1
                    self.stats.timed_out += int(result.timed_out)
                if on_result is not None:
                    on_result(job.index, result)

        abort: list[str] = []

        def worker() -> None:
            tracker = None
            while not abort:
                try:
                    job = jobs.get(timeout=0.05)
                except queue.Empty:
                    with self._lock:
                        if remaining[0] == 0:
                            return
                    continue
                job.attempts += 1
                try:
                    tracker = tracker or self._tracker_session()
                    run_secs, device = self._measure_once(tracker, job)
                    with self._lock:
                        self.stats.devices.add(device)
                    finish(job, Measurement(run_secs=run_secs, device=device))
                except _TrackerDown as err:
                    tracker = None
                    job.attempts -= 1  # not the candidate's fault
                    if err.fatal:  # nothing more can be measured: stop every thread
                        abort.append(str(err))
                        return
                    else:
                        time.sleep(0.2)
                        jobs.put(job)
                except _DeviceGone as err:
                    job.attempts -= 1
                    job.requeues += 1
                    with self._lock:
                        self.stats.requeued += 1
                    if job.requeues > 10:
                        finish(job, Measurement(error=f"no device accepted a session: {err}"))
                    else:
                        log.warning("device %s: requeueing candidate %d", err, job.index)
                        time.sleep(0.2)
                        jobs.put(job)
                except Exception as err:  # the session failed: classify
                    tracker = None  # its connection may be gone with the server
                    text = _first_line(err)
                    if "SessionTimeout" in str(err) or "Timeout" in text:
                        log.warning("candidate %d timed out after %.0f s: marked failed", job.index, self.timeout_s)
                        finish(job, Measurement(error=f"timeout after {self.timeout_s:.0f} s", timed_out=True))
                    elif job.attempts < self.max_attempts:
                        with self._lock:
                            self.stats.retried += 1
                        log.warning("candidate %d lost its device (%s): retrying on another", job.index, text)
                        jobs.put(job)
                    else:
                        log.warning("candidate %d failed on %d devices (%s): marked failed", job.index,
                                    job.attempts, text)
                        finish(job, Measurement(error=f"failed {job.attempts} times: {text}"))

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lastbit-measure") as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()
        if abort:
            raise FarmError(abort[0])
        return [r if r is not None else Measurement(error="not measured") for r in results]

    def _tracker_session(self):
        """A tracker connection, retried while the tracker is down (a restart)."""
        deadline = time.monotonic() + self.tracker_wait_s
        first = True
        while True:
            try:
                session = connect_tracker(self.host, self.port, timeout_s=1.0)
                if not first:
                    with self._lock:
                        self.stats.tracker_reconnects += 1
                    log.warning("tracker %s:%d is back", self.host, self.port)
                return session
            except FarmError:
                if first:
                    log.warning("tracker %s:%d unreachable; waiting up to %.0f s", self.host, self.port,
                                self.tracker_wait_s)
                first = False
                if time.monotonic() >= deadline:
                    raise _TrackerDown(f"tracker {self.host}:{self.port} unreachable for "
                                       f"{self.tracker_wait_s:.0f} s", fatal=True) from None

    def _request(self, tracker):
        """Ask the tracker for a free device of our key and open a session on it that the
        server kills after ``timeout_s``.  Same protocol as ``TrackerSession.request``, but
        it tells which device answered, and waits at most ``tracker_wait_s`` for one."""
        import socket

        from tvm import rpc
        from tvm.rpc import base

        try:
            if tracker._sock is None:  # TrackerSession keeps its socket private
                tracker._connect()
            tracker._sock.settimeout(self.tracker_wait_s)
            base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, self.key, "", 1])
            value = base.recvjson(tracker._sock)
            tracker._sock.settimeout(None)
        except socket.timeout:
            tracker.close()
            if _tracker_alive(self.host, self.port):
                raise _TrackerDown(f"no free worker with key '{self.key}' at tracker {self.host}:{self.port} "
                                   f"for {self.tracker_wait_s:.0f} s", fatal=True) from None
            raise _TrackerDown("tracker went away") from None
        except (OSError, ValueError, TypeError) as err:  # reset / closed / half-read answer
            tracker.close()
            raise _TrackerDown(f"tracker went away: {_first_line(err)}") from None
        if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
            raise _TrackerDown(f"tracker answered {value!r}")
        url, port, matchkey = value[1]
        try:
            session = rpc.connect(url, port, matchkey, session_timeout=self.timeout_s)
        except Exception as err:  # the device died after the tracker handed it out
            raise _DeviceGone(f"{url}:{port}: {_first_line(err)}") from None
        return session, f"{url}:{port}"

    def _measure_once(self, tracker, job: _Job) -> tuple[list[float], str]:
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig
        from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

        session, device_name = self._request(tracker)
        if self.qemu_triple is not None:
            from lastbit.autotune.qemu_device import CLOCK_HZ, MEASURE_FUNC

            measure = session.get_function(MEASURE_FUNC)
            cycles = float(measure(bytearray(Path(job.artifact).read_bytes()), self.qemu_triple))
            del measure, session
            return [cycles / CLOCK_HZ], device_name
        remote_name = Path(job.artifact).name
        session.upload(job.artifact, remote_name)
        module = session.load_module(remote_name)
        dev = session.device(self.device, 0)
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
        args = alloc_argument_common(fill, dev, job.args_info, 1)
        config = EvaluatorConfig(number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms,
                                 enable_cpu_cache_flush=False)
        costs = run_evaluator_common(module, dev, config, args)
        del module, args, dev, fill, session  # closing the session frees the device
        return [float(c) for c in costs], device_name


class _DeviceGone(Exception):
    """The device the tracker named did not accept the session (the candidate never ran)."""


class _TrackerDown(Exception):
    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


def _tracker_alive(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    for line in lines:  # TVM errors start with a traceback header; show the message line
        if "Error" in line and not line.lstrip().startswith(("File", "Traceback")):
            return line.strip()[:300]
    return (lines[-1].strip() if lines else type(err).__name__)[:300]

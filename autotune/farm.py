"""The device farm: TVM's RPC tracker and servers, wrapped so they bind loopback unless told
otherwise, come back after a crash, and can be listed.

* ``run_tracker`` — TVM's tracker (``python -m tvm.exec.rpc_tracker``) on one fixed port.
* ``run_worker`` — TVM's RPC server loop registered under a key, *supervised*: a kernel
  that crashes its session (which leaves TVM's stock server hung, tvm #10240) only costs
  a restart, and a tracker that goes away is re-joined by TVM's own loop.  On a board the
  stock ``python -m tvm.exec.rpc_server`` works too (docs/AUTOTUNE.md), without the restart.
  A worker is a ``device``: this CPU (``host``) or a qemu device that returns the cycle
  model's estimate for ARM candidates (``autotune/qemu_device.py``), and says which.
* ``farm_status`` — free / pending devices per key, from the tracker's summary.
* ``LocalFarm`` — a tracker and N workers on 127.0.0.1 ports picked free, as a context
  manager: local tuning, the tests and the throughput benchmark use it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_TRACKER_PORT = 9190
HOST_DEVICE = "host"  # a worker that runs candidates on its own CPU
DEVICE_KIND_FUNC = "lastbit.farm.device_kind"  # what a lastbit worker measures with (stock servers: the host)


class FarmError(LastbitError):
    """The tracker cannot be reached, or a farm process failed to start; the message names
    the host:port or the command."""


def parse_address(text: str, default_port: int = DEFAULT_TRACKER_PORT) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``) -> (host, port); a bad port raises FarmError."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        return host or LOOPBACK, int(port)
    except ValueError:
        raise FarmError(f"bad tracker address '{text}': expected HOST:PORT") from None


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def connect_tracker(host: str, port: int, timeout_s: float = 10.0):
    """A TVM ``TrackerSession``; FarmError naming host:port when nobody answers there."""
    from tvm import rpc

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                pass
            return rpc.connect_tracker(host, port)
        except (OSError, RuntimeError) as err:
            if time.monotonic() >= deadline:
                raise FarmError(f"no RPC tracker answers at {host}:{port} ({err})") from None
            time.sleep(0.2)


@dataclass(frozen=True)
class KeyStatus:
    """One key of the tracker's queue: devices free now, and requests waiting for one."""

    key: str
    free: int
    pending: int
    servers: tuple[str, ...]  # host:port of each registered server


def farm_status(host: str, port: int, timeout_s: float = 5.0) -> list[KeyStatus]:
    """The devices registered at the tracker, per key."""
    summary = connect_tracker(host, port, timeout_s).summary()
    servers: dict[str, list[str]] = {}
    for info in summary.get("server_info", []):
        key = str(info.get("key", ""))
        if key.startswith("server:"):
            addr = info.get("addr") or ["?", "?"]
            servers.setdefault(key[len("server:"):], []).append(f"{addr[0]}:{addr[1]}")
    rows = []
    queue = summary.get("queue_info", {})
    for key in sorted(set(queue) | set(servers)):
        stats = queue.get(key, {})
        rows.append(KeyStatus(key, int(stats.get("free", 0)), int(stats.get("pending", 0)), tuple(servers.get(key, []))))
    return rows


def free_workers(host: str, port: int, key: str) -> int:
    """Workers of ``key`` registered at the tracker (free or busy), at least 0."""
    for row in farm_status(host, port):
        if row.key == key:
            return max(row.free, len(row.servers))
    return 0


# -- processes --------------------------------------------------------------------------------


def tracker_command(host: str, port: int) -> list[str]:
    """TVM's tracker on exactly ``port`` (its own search would silently move elsewhere)."""
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + 1), "--silent"]


def server_command(tracker: str, key: str, host: str = LOOPBACK, port: int = 9090, port_end: int = 9199,
                   device: str = HOST_DEVICE) -> list[str]:
    """One RPC server process (:func:`serve`); it exits when a session crashes."""
    return [sys.executable, "-m", "lastbit.autotune.farm", "serve", tracker, key, host, str(port), str(port_end), device]


def worker_devices() -> list[str]:
    """What a supervised worker can measure with: this CPU, or one qemu-user binary per
    emulated architecture (``autotune/qemu_device.py``: estimated cycles, no board)."""
    from lastbit.autotune.qemu_device import qemu_devices

    return [HOST_DEVICE, *qemu_devices()]


def register_device(device: str) -> None:
    """Register in this process what its RPC sessions (forked from it) need to measure as
    ``device``, and :data:`DEVICE_KIND_FUNC`, which tells the tuner which device it reached."""
    import tvm

    if device not in worker_devices():
        raise FarmError(f"unknown worker device '{device}'; known: {', '.join(worker_devices())}")
    if device != HOST_DEVICE:
        from lastbit.autotune import qemu_device

        qemu_device.register(device)
    tvm.register_global_func(DEVICE_KIND_FUNC, lambda: device, override=True)


def serve(tracker: str, key: str, host: str = LOOPBACK, port: int = 9090, port_end: int = 9199,
          device: str = HOST_DEVICE) -> None:
    """TVM's RPC server loop in this process, registered with ``tracker`` under ``key``.

    ``python -m tvm.exec.rpc_server`` runs the same loop inside a pool worker; when a kernel
    crashes its session the loop raises, the pool worker survives it and the server hangs
    forever, deregistered (tvm #10240).  Running the loop here instead makes that crash end
    the process, so :func:`run_worker` restarts it.
    """
    import errno

    from tvm.rpc import server as tvm_server

    register_device(device)  # sessions are forked from this process: they inherit it
    tracker_addr = parse_address(tracker)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for candidate in range(port, port_end):
        try:
            sock.bind((host, candidate))
            break
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
    else:
        raise FarmError(f"no free port in [{port}, {port_end}) on {host} for an RPC worker")
    sock.listen(1)
    bound = sock.getsockname()[1]
    log.info("RPC worker '%s' (%s) serving on %s:%d", key, device, host, bound)
    tvm_server._listen_loop(sock, bound, key, tracker_addr, None, None)


def run_tracker(host: str = LOOPBACK, port: int = DEFAULT_TRACKER_PORT) -> None:
    """Serve a tracker until interrupted (``lastbit farm tracker``); Ctrl-C or SIGTERM stop
    it together with TVM's tracker process and its pool worker."""
    proc = subprocess.Popen(tracker_command(host, port), start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    log.warning("RPC tracker listening on %s:%d (Ctrl-C stops it)", host, port)
    try:
        if proc.wait() != 0:
            raise FarmError(f"the RPC tracker on {host}:{port} exited with status {proc.returncode} "
                            f"(port taken?)")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)


def run_worker(tracker: str, key: str, host: str = LOOPBACK, port: int = 9090, threads: int | None = None,
               max_restarts: int | None = None, restart_delay_s: float = 0.5, device: str = HOST_DEVICE) -> None:
    """Serve measurements for ``key`` until interrupted, restarting TVM's RPC server whenever
    it exits (a crashing kernel takes it down with its session). ``device``: one of
    :func:`worker_devices`."""
    if device not in worker_devices():
        raise FarmError(f"unknown worker device '{device}'; known: {', '.join(worker_devices())}")
    env = dict(os.environ)
    if threads:
        env["TVM_NUM_THREADS"] = str(threads)
    restarts = 0
    stopping = False

    def stop(signum, frame):  # SIGTERM from a supervisor of ours: stop restarting
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    proc = None
    try:
        while True:
            proc = subprocess.Popen(server_command(tracker, key, host, port, device=device), env=env)
            log.warning("RPC worker '%s' (pid %d) started for tracker %s", key, proc.pid, tracker)
            code = proc.wait()
            if stopping:
                break
            restarts += 1
            if max_restarts is not None and restarts > max_restarts:
                raise FarmError(f"RPC worker '{key}' exited {restarts} times (last status {code}); giving up")
            log.warning("RPC worker '%s' exited with status %s (a crashed kernel?); restart %d", key, code, restarts)
            time.sleep(restart_delay_s)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _stop_group(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Stop a process we started in its own session, with everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait_listening(host: str, port: int, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FarmError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FarmError(f"{what} is not listening on {host}:{port} after {timeout_s:.0f} s")


class LocalFarm:
    """A tracker and ``workers`` supervised workers on loopback, for local tuning and tests.

    Every process runs in its own session so :meth:`kill_worker` / :meth:`close` stop it and
    all its children (server, session) without touching anything else.  ``threads`` sets
    ``TVM_NUM_THREADS`` in the workers (1 lets N workers share a small machine fairly);
    ``device`` what they measure with (:func:`worker_devices`).
    """

    def __init__(self, workers: int = 1, key: str = "local", threads: int | None = None,
                 start_timeout_s: float = 60.0, device: str = HOST_DEVICE) -> None:
        self.key = key
        self.device = device
        self.host = LOOPBACK
        self.port = free_port()
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self._tracker: subprocess.Popen | None = None
        self._workers: list[subprocess.Popen] = []
        self._num_workers = workers

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> "LocalFarm":
        try:
            self.start_tracker()
            for _ in range(self._num_workers):
                self.add_worker()
            self.wait_for_workers(self._num_workers)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_tracker(self) -> None:
        self._tracker = subprocess.Popen(tracker_command(self.host, self.port), start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.host, self.port, self.start_timeout_s, self._tracker, "the RPC tracker")

    def stop_tracker(self) -> None:
        if self._tracker is not None:
            _stop_group(self._tracker)
            self._tracker = None

    def restart_tracker(self, down_s: float = 0.0) -> None:
        """Stop the tracker, stay down ``down_s`` seconds, start it again on the same port."""
        self.stop_tracker()
        time.sleep(down_s)
        self.start_tracker()

    def add_worker(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "lastbit.autotune.farm", "worker", self.tracker, self.key,
               str(self.threads or 0), self.device]
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._workers.append(proc)
        return proc

    def kill_worker(self, index: int = 0) -> None:
        """SIGKILL one worker with its server and session: a device pulled from the farm."""
        proc = self._workers.pop(index)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def kill_device(self, address: str) -> None:
        """SIGKILL the worker whose server listens on ``address`` (host:port, as the
        runner reports devices)."""
        import psutil

        port = int(address.rsplit(":", 1)[1])
        for index, proc in enumerate(self._workers):
            try:
                family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
                ports = {c.laddr.port for p in family for c in p.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                continue
            if port in ports:
                self.kill_worker(index)
                return
        raise FarmError(f"no worker of this farm listens on {address}")

    def wait_for_workers(self, count: int, timeout_s: float | None = None) -> None:
        """Block until ``count`` workers of our key are registered with the tracker."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        seen = 0
        while time.monotonic() < deadline:
            try:
                seen = free_workers(self.host, self.port, self.key)
            except FarmError:
                seen = 0
            if seen >= count:
                return
            time.sleep(0.2)
        raise FarmError(f"only {seen} of {count} workers registered with {self.tracker} "
                        f"after {timeout_s or self.start_timeout_s:.0f} s")

    def close(self) -> None:
        for proc in self._workers:
            _stop_group(proc)
        self._workers.clear()
        self.stop_tracker()


def _main(argv: list[str]) -> None:
    """``python -m lastbit.autotune.farm worker TRACKER KEY [THREADS [DEVICE]]`` (LocalFarm's
    supervised workers; THREADS 0: TVM's default) and ``... serve TRACKER KEY HOST PORT
    PORT_END [DEVICE]`` (one server)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if 3 <= len(argv) <= 5 and argv[0] == "worker":
        threads = int(argv[3]) if len(argv) > 3 else 0
        run_worker(argv[1], argv[2], threads=threads or None, device=argv[4] if len(argv) > 4 else HOST_DEVICE)
    elif len(argv) in (6, 7) and argv[0] == "serve":
        serve(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), device=argv[6] if len(argv) > 6 else HOST_DEVICE)
    else:
        raise SystemExit("usage: python -m lastbit.autotune.farm worker TRACKER KEY [THREADS [DEVICE]] | "
                         "serve TRACKER KEY HOST PORT PORT_END [DEVICE]")


if __name__ == "__main__":
    _main(sys.argv[1:])

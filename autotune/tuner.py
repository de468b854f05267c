"""``lastbit tune``: AutoTVM-style search over our schedule templates, measured on a device
farm, every result kept in the tuning database.

Per task: the default schedule is measured first (it is the baseline of the summary table
and a record like any other, so the database's best is never slower than the default);
then each round samples a pool of fresh candidates by re-running the task's template with
new random decisions (``sample_perfect_tile`` / ``sample_categorical``), ranks the pool with
MetaSchedule's XGBoost cost model once it has seen a round (the first round is random),
measures the best few plus a random share on all free devices of the farm key at once
(``FarmRunner``), commits each result to the database as it arrives, and updates the cost
model.  There is no evolutionary search: our templates change loop structure with the tile
sizes, so traces cannot be mutated (see ``Tuner._search``).  ``trials`` is the budget per
task *including* what the database already holds, so ``--resume`` after an interruption
carries on where it stopped and never measures a candidate twice (a candidate sampled
again is answered from the database).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lastbit.autotune.database import FAILED_SECS, TuningDatabase, latency_s, target_dir
from lastbit.autotune.runner import CandidateBuilder, FarmRunner, Measurement, MeasureStats
from lastbit.autotune.tasks import TuningTask, extract_tasks, load_cpu_tensor_intrinsics
from lastbit.errors import LastbitError

log = logging.getLogger(__name__)


class TuneError(LastbitError):
    """Tuning cannot start: a database that already holds records without ``resume``, …"""


@dataclass
class TaskResult:
    """One task's outcome: latencies in ms (None when never measured successfully)."""

    name: str
    kind: str
    weight: int
    tunable: bool
    default_ms: float | None
    best_ms: float | None
    measured: int = 0  # new measurements this run
    reused: int = 0  # candidates answered from the database
    failed: int = 0
    macs: int | None = None  # useful MACs of one call (integer kernels): with a peak, a roofline

    @property
    def speedup(self) -> float | None:
        if not self.default_ms or not self.best_ms:
            return None
        return self.default_ms / self.best_ms

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weight": self.weight, "tunable": self.tunable,
                "default_ms": self.default_ms, "best_ms": self.best_ms, "measured": self.measured,
                "reused": self.reused, "failed": self.failed, "macs": self.macs}

    def fraction_of_peak(self, which: str, peak_gmacs: float) -> float | None:
        """The default's or the best candidate's MAC rate over ``peak_gmacs`` (None without MACs or a time)."""
        ms = self.default_ms if which == "default" else self.best_ms
        return self.macs / ms / 1e6 / peak_gmacs if self.macs and ms else None


@dataclass
class TuneResult:
    target: str
    db_dir: Path
    tasks: list[TaskResult]
    stats: MeasureStats = field(default_factory=MeasureStats)
    elapsed_s: float = 0.0
    measure: str = "board time"  # what the latencies are (:func:`measure_of`)

    @property
    def unit(self) -> str:
        """Column unit: ms of measured time, or millions of estimated cycles (a cycle model
        at the nominal 1 GHz of ``qemu_device.CLOCK_HZ``: 1 ms = 1 Mcycle)."""
        return "ms" if self.measure == "board time" else "Mcyc"

    def model_ms(self, which: str) -> float | None:
        """Sum over tasks of latency × calls: the kernel time of one inference."""
        values = [getattr(t, f"{which}_ms") for t in self.tasks]
        if any(v is None for v in values):
            return None
        return sum(v * t.weight for v, t in zip(values, self.tasks))

    def format_table(self, peak_gmacs: float | None = None) -> str:
        """Per task default vs tuned latency, then the weighted total and the farm counters; with
        ``peak_gmacs`` (the measuring machine's MAC peak, ``autotune.roofline``) a column of
        each integer task's default → tuned fraction of it: how much any schedule could still give."""
        unit = self.unit
        roof = peak_gmacs is not None and unit == "ms"
        head = (f"{'task':<34} {'kind':<16} {'calls':>5} {'trials':>6} {'failed':>6} {'default ' + unit:>11} "
                f"{'tuned ' + unit:>10} {'speedup':>8}" + (f" {'of peak':>11}" if roof else ""))
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            of_peak = ""
            if roof:
                default, best = t.fraction_of_peak("default", peak_gmacs), t.fraction_of_peak("best", peak_gmacs)
                of_peak = f" {(f'{default:.0%} → {best:.0%}' if default and best else '-'):>11}"
            lines.append(
                f"{t.name[:34]:<34} {t.kind.replace('lastbit.', '')[:16]:<16} {t.weight:>5} {t.measured + t.reused:>6} "
                f"{t.failed:>6} {_ms(t.default_ms):>11} {_ms(t.best_ms):>10} "
                f"{(f'{t.speedup:.2f}x' if t.speedup else '-'):>8}{of_peak}"
            )
        default, best = self.model_ms("default"), self.model_ms("best")
        if default and best:
            lines.append(f"{'model (sum of calls)':<34} {'':<16} {'':>5} {'':>6} {'':>6} {_ms(default):>11} "
                         f"{_ms(best):>10} {default / best:>7.2f}x")
        s = self.stats
        lines.append(f"measured {s.measured}, failed {s.failed} (timed out {s.timed_out}), retried {s.retried}, "
                     f"requeued {s.requeued}, devices {len(s.devices)}, tracker reconnects {s.tracker_reconnects}; "
                     f"{self.elapsed_s:.0f} s")
        if unit != "ms":
            lines.append(f"{unit}: millions of {self.measure}, not board time")
        return "\n".join(lines)


def _key(sch) -> int:
    """Identity of a candidate: the structural hash of its scheduled module."""
    import tvm_ffi

    return tvm_ffi.structural_hash(sch.mod)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _latency_ms(run_secs: list[float] | None) -> float | None:
    secs = latency_s(run_secs)
    return None if secs >= FAILED_SECS else secs * 1e3


class Tuner:
    """Tunes the tasks of one model on one target into one database.

    ``builder`` and ``runner`` are a :class:`CandidateBuilder` and a :class:`FarmRunner`
    (tests pass wrapped ones).  ``on_round(task, done)`` is called after every measured
    round; raising ``KeyboardInterrupt`` from it behaves like Ctrl-C.  ``confirm`` > 0
    re-measures the default and the best schedule of each tuned task that many times,
    alternating, and reports the medians of those re-runs: on a busy device the load drifts
    between the first measurement of the default and the last of the search, and the
    search's best is the luckiest of many noisy measurements.  The re-runs are stored as
    further records of those two candidates, and once a task has them the database lets
    only re-measured candidates win, so ``compile --db`` applies the confirmed winner or
    the default, never a runner-up that looked fast once (``database.Candidate``).
    """

    def __init__(self, target, db: TuningDatabase, builder: CandidateBuilder, runner: FarmRunner, *,
                 trials: int = 64, per_round: int = 16, seed: int = 0, progress: bool = True, confirm: int = 3,
                 on_round: Callable[[TuningTask, int], None] | None = None, measure: str = "board time") -> None:
        self.target = target
        self.tvm_target = target.tvm()
        self.db = db
        self.builder = builder
        self.runner = runner
        self.trials = trials
        self.per_round = per_round
        self.seed = seed
        self.progress = progress
        # a deterministic measure (the qemu cycle model) gives the same number again
        self.confirm = 0 if getattr(runner, "deterministic", False) else confirm
        self.on_round = on_round
        self.measure = measure

    def tune(self, tasks: list[TuningTask]) -> TuneResult:
        from tqdm import tqdm

        start = time.monotonic()
        budgets = {t.name: (self.trials if t.tunable else 1) for t in tasks}
        overall = tqdm(total=sum(budgets.values()), desc="all tasks", unit="trial", position=0,
                       disable=not self.progress, leave=True)
        results = []
        try:
            for task in tasks:
                results.append(self._tune_task(task, budgets[task.name], overall))
        finally:
            overall.close()
            self.db.write_summary([r.to_json() for r in results])
        return TuneResult(self.target.triple, self.db.folder, results, self.runner.stats, time.monotonic() - start,
                          self.measure)

    # -- one task -------------------------------------------------------------------------------
    def _tune_task(self, task: TuningTask, budget: int, overall) -> TaskResult:
        import tvm_ffi
        from tqdm import tqdm

        from lastbit.autotune.templates import default_schedule

        known = self.db.measured(task.mod)
        result = TaskResult(task.name, task.kind, task.weight, task.tunable, None, None, macs=task.macs)
        bar = tqdm(total=budget, desc=task.name[:28], unit="trial", position=1, leave=False, disable=not self.progress)
        best = [None]

        def account(m_ms: float | None, new: bool) -> None:
            if new:
                result.measured += 1
            else:
                result.reused += 1
            if m_ms is None and new:
                result.failed += 1
            if m_ms is not None and (best[0] is None or m_ms < best[0]):
                best[0] = m_ms
            bar.update(1)
            overall.update(1)
            bar.set_postfix_str(f"best {_ms(best[0])} ms")
            overall.set_postfix_str(f"{task.name[:20]} best {_ms(best[0])} ms")

        try:
            default = default_schedule(task.mod, self.tvm_target)
            key = tvm_ffi.structural_hash(default.mod)
            if key in known:
                result.default_ms = _latency_ms(known[key])
                account(result.default_ms, new=False)
            else:
                (measurement,) = self._measure(task, [default], account)
                result.default_ms = measurement.latency_ms
                known[key] = measurement.run_secs or [FAILED_SECS]
            if task.tunable:
                self._search(task, budget - 1, known, account)
        finally:
            if bar.n < budget:  # the template ran out of candidates: shrink the overall bar
                overall.total -= budget - bar.n
                overall.refresh()
            bar.close()
        found = self.db.fastest(task.mod)  # the search's winner, by the one measurement that ranked it
        if self.confirm and found is not None and result.default_ms is not None and found[1] * 1e3 < result.default_ms:
            self._confirm(task, default, found[0])
            result.default_ms = _latency_ms(self.db.measured(task.mod).get(_key(default)))
        found = self.db.best(task.mod)  # what compile --db applies: a confirmed winner, else the default
        result.best_ms = found[1] * 1e3 if found else None
        log.info("task %s: default %s ms, tuned %s ms (%d measured, %d from the database, %d failed)", task.name,
                 _ms(result.default_ms), _ms(result.best_ms), result.measured, result.reused, result.failed)
        return result

    def _search(self, task: TuningTask, budget: int, known: dict, account) -> None:
        """AutoTVM-style template search: sample a pool of fresh candidates by running the
        template with new random decisions, rank it with the XGBoost cost model (once it
        has seen a round), measure the best few plus a random share, update the model.

        The template is re-run for every candidate rather than mutating traces, because
        our schedules change their loop structure with the tile sizes (a unit loop vanishes
        after ``reverse_compute_at``) and MetaSchedule's trace mutation cannot follow that.
        """
        import random

        import numpy as np
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.runner import RunnerResult

        from lastbit.autotune.templates import tuning_space

        done_before = max(0, len(known) - 1)  # earlier runs' trials (the default is not one)
        remaining = budget - done_before
        for _ in range(min(budget, done_before)):
            account(None, new=False)  # the bars count the budget earlier runs spent
        if remaining <= 0:
            return
        ctx = ms.TuneContext(mod=task.mod, target=self.tvm_target, space_generator=tuning_space(self.tvm_target),
                             task_name=task.name, rand_state=self.seed, num_threads=1)
        cost_model = ms.cost_model.XGBModel(num_warmup_samples=self.per_round, num_tuning_cores=1, verbose_eval=0)
        args_info = ArgInfo.from_prim_func(task.mod["main"])
        rng = random.Random(f"{self.seed}/{task.name}")
        trained = False
        new_done = 0
        while new_done < remaining:
            pool = self._sample_pool(task, known, rng, size=4 * self.per_round)
            if not pool:
                log.info("task %s: every candidate of the template is measured; stopping early", task.name)
                break
            count = min(self.per_round, remaining - new_done, len(pool))
            if trained:
                candidates = [ms.MeasureCandidate(sch, args_info) for sch in pool]
                scores = np.asarray(cost_model.predict(ctx, candidates))
                ranked = [pool[i] for i in np.argsort(-scores, kind="stable")]
                explore = max(1, count // 4) if len(ranked) > count else 0  # epsilon-greedy share
                chosen = ranked[: count - explore]
                rest = ranked[count - explore:]
                chosen += rng.sample(rest, min(explore, len(rest)))
            else:
                chosen = rng.sample(pool, count)
            measurements = self._measure(task, chosen, account)
            for sch, m in zip(chosen, measurements):
                known[_key(sch)] = m.run_secs or [FAILED_SECS]
            results = [RunnerResult(m.run_secs, None) if m.ok else RunnerResult(None, m.error or "failed")
                       for m in measurements]
            cost_model.update(ctx, [ms.MeasureCandidate(sch, args_info) for sch in chosen], results)
            trained = True
            new_done += len(chosen)
            if self.on_round is not None:
                self.on_round(task, new_done)

    def _confirm(self, task: TuningTask, default, best) -> None:
        """Re-measure the default and the best schedule ``confirm`` times each, alternating,
        and store the runs as further records of those two candidates: the database then
        judges them by these runs alone, and lets only re-measured candidates win
        (``database.Candidate``, ``TuningDatabase.best``)."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo

        built = self.builder.build([default.mod, best.mod])
        if any(path is None for path, _ in built):
            return
        args_info = ArgInfo.from_prim_func(task.mod["main"])
        args = [a.as_json() for a in args_info]
        schedules = [default, best] * self.confirm

        def on_result(i: int, m: Measurement) -> None:
            if m.ok:  # a failed re-run says nothing about the schedule; keep the first result
                self.db.commit(task.mod, schedules[i].trace, m.run_secs, args_info)

        self.runner.measure([(built[0][0], args), (built[1][0], args)] * self.confirm, on_result=on_result,
                            count=False)
        for path, _ in built:
            Path(path).unlink(missing_ok=True)

    def _sample_pool(self, task: TuningTask, known: dict, rng, size: int) -> list:
        """Up to ``size`` distinct, not yet measured schedules of the task's template."""
        from tvm import s_tir

        from lastbit.autotune.templates import design_spaces

        pool: dict[int, object] = {}
        misses = 0
        while len(pool) < size and misses < 3 * size:
            sch = s_tir.Schedule(task.mod, seed=rng.randrange(1, 2**31 - 1))
            new = 0
            for space in design_spaces(sch, self.tvm_target):
                key = _key(space)
                if key not in known and key not in pool:
                    pool[key] = space
                    new += 1
            misses += 0 if new else 1
        return list(pool.values())

    def _measure(self, task: TuningTask, schedules: list, account) -> list[Measurement]:
        """Build and measure schedules of ``task``, committing each result as it arrives."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo

        if not schedules:
            return []
        args_info = ArgInfo.from_prim_func(task.mod["main"])
        args_json = [a.as_json() for a in args_info]
        built = self.builder.build([sch.mod for sch in schedules])
        results: list[Measurement | None] = [None] * len(schedules)
        to_run, positions = [], []
        for i, (path, error) in enumerate(built):
            if path is None:
                results[i] = Measurement(error=error)
                self.db.commit(task.mod, schedules[i].trace, None, args_info)
                account(None, new=True)
            else:
                positions.append(i)
                to_run.append((path, args_json))

        def on_result(j: int, m: Measurement) -> None:  # runs in a measuring thread, serialized
            i = positions[j]
            results[i] = m
            self.db.commit(task.mod, schedules[i].trace, m.run_secs, args_info)
            account(m.latency_ms, new=True)

        self.runner.measure(to_run, on_result=on_result)
        for path, _ in to_run:
            Path(path).unlink(missing_ok=True)
        return [r if r is not None else Measurement(error="not measured") for r in results]


def check_device(target, device: str, where: str) -> None:
    """One clear error when ``device`` (what a farm's workers measure with) cannot measure
    ``target``: a qemu device runs only its own architecture's targets.  A host device may
    be a board of the target's architecture running TVM's server, so it is accepted."""
    from lastbit.autotune.farm import HOST_DEVICE
    from lastbit.autotune.qemu_device import device_name

    if device == HOST_DEVICE:
        return
    needs = device_name(target.qemu) if target.runner == "qemu" and target.qemu else None
    if device != needs:
        hint = f"start workers with --device {needs}" if needs else "use workers without --device (host)"
        raise TuneError(f"{where} measure with '{device}', which cannot measure target '{target.triple}' "
                        f"(runs on '{target.runner}'): {hint}")


def local_device(target) -> str:
    """What the private loopback farm measures ``target`` with: this CPU for the host, the
    qemu cycle-model device for an ARM target (no board here)."""
    from lastbit.autotune.farm import HOST_DEVICE
    from lastbit.autotune.qemu_device import device_name

    if target.runner == "qemu" and target.qemu:
        return device_name(target.qemu)
    return HOST_DEVICE


def measure_of(target, device: str) -> str:
    """What the tuning table's numbers are: measured time, or the cycle model's estimate."""
    from lastbit.autotune.farm import HOST_DEVICE
    from lastbit.autotune.qemu_device import cycle_core

    if device == HOST_DEVICE:
        return "board time"
    return f"estimated cycles ({cycle_core(target)} cycle model on qemu instruction counts)"


QEMU_TIMEOUT_S = 300.0  # counting under qemu with full logs is slow: a big conv takes a minute


@contextlib.contextmanager
def farm_runner(tracker: str | None, key: str | None, target, timeout_s: float | None = None, local_workers: int = 1):
    """(FarmRunner, device) on the given tracker, or on a private loopback farm of
    ``local_workers`` workers of :func:`local_device` when ``tracker`` is None (checked first:
    nothing is written if it is down).  A tracker's workers are asked what they measure
    with (:func:`check_device`); a qemu device makes the runner measure estimated cycles."""
    from lastbit.autotune.farm import HOST_DEVICE, LocalFarm, parse_address

    def configured(runner: FarmRunner, device: str) -> FarmRunner:
        if device != HOST_DEVICE:
            runner.qemu_triple = target.triple
        runner.timeout_s = timeout_s if timeout_s is not None else (QEMU_TIMEOUT_S if runner.qemu_triple else 10.0)
        return runner

    if tracker:
        host, port = parse_address(tracker)
        runner = FarmRunner(host, port, key or "local")
        device = runner.device_kind()
        check_device(target, device, f"the workers of key '{runner.key}' at {tracker}")
        yield configured(runner, device), device
        return
    device = local_device(target)
    with LocalFarm(workers=local_workers, key=key or "local", device=device) as farm:
        yield configured(FarmRunner(farm.host, farm.port, farm.key), device), device


def tune_model(model, target: "str | object" = "x86_64-linux-gnu", db_dir: "str | Path" = "tuning-db", *,
               trials: int = 64, example_inputs=None, squeeze=None, tracker: str | None = None,
               key: str | None = None, resume: bool = False, progress: bool = True, timeout_s: float | None = None,
               per_round: int = 16, seed: int = 0, name: str | None = None, max_tasks: int | None = None,
               confirm: int = 3, on_round: Callable[[TuningTask, int], None] | None = None,
               integer_only: bool = False, trust_pickle: bool = False) -> TuneResult:
    """Tune every task of ``model`` (anything ``lastbit.compile`` takes) for ``target`` and
    store the records under ``db_dir``; ``lastbit.compile(..., db=db_dir)`` applies them.

    Without ``tracker`` a private loopback farm with one worker measures: this CPU for the
    host, for an ARM target a qemu device (estimated cycles of the target core's cycle model
    from qemu instruction counts, ``autotune/qemu_device.py``: a model, not board time);
    with ``tracker="HOST:PORT"`` and ``key`` the farm's devices of that key do (boards, or
    ``lastbit farm worker --device qemu-aarch64``).  An accelerator target (runner "sim")
    tunes its offloaded layers' tilings on the timing simulator instead
    (``autotune/accel_tuning.py``; its workers: ``--device accel-sim``).  ``timeout_s`` per measurement: 10 s
    on a device, 300 s under qemu unless given.  A database that
    already holds records for the target needs ``resume=True``.  ``max_tasks`` keeps only
    the heaviest tasks (FLOPs × calls), for a quick look at a big model; ``integer_only``
    keeps only the integer kernels of quantized layers (tasks of kind ``int:<kernel>``).
    ``trust_pickle`` as in ``lastbit.compile`` (a .pt2 file is unpickled when loaded).
    """
    from lastbit.pipeline import import_model, integer_lowering, lower, squeeze_passes
    from lastbit.targets import get_target

    target = get_target(target)
    if target.runner != "sim" and str(target.tvm().kind.name) != "llvm":
        raise TuneError(f"target '{target.triple}' is not a CPU: no template or device tunes it")
    folder = target_dir(db_dir, target.triple)
    if not resume and folder.is_dir() and any(folder.glob("database_*.json")):
        raise TuneError(f"tuning database {folder} already holds records for {target.triple}; "
                        f"pass resume=True (--resume) to continue it or choose another directory")
    graph = import_model(model, example_inputs, name=name, trust_pickle=trust_pickle)
    torch_module = model if hasattr(model, "state_dict") else None
    for squeeze_pass in squeeze_passes(squeeze, torch_module, target):  # as lastbit.compile does
        graph = squeeze_pass(graph)
    if target.runner == "sim":  # the offloaded layers' tilings, on the timing simulator
        from lastbit.autotune.accel_tuning import tune_accel

        return tune_accel(graph, target, db_dir, trials=trials, tracker=tracker, key=key, resume=resume)
    tvm_target = target.tvm()
    load_cpu_tensor_intrinsics()
    tasks = extract_tasks(lower(graph, target, integer=integer_lowering(target, squeeze)), tvm_target)
    if integer_only:
        tasks = [t for t in tasks if t.kind.startswith("int:")]
    if max_tasks is not None:
        tasks = tasks[:max_tasks]  # extract_tasks sorts heaviest first
    with farm_runner(tracker, key, target, timeout_s=timeout_s) as (runner, device):
        measure = measure_of(target, device)
        db = TuningDatabase(db_dir, target)  # only once the farm answered
        held = db.measure()
        if held is not None and held != measure:
            raise TuneError(f"tuning database {db.folder} holds {held}; this run measures {measure}: "
                            f"the two do not compare, use another --db")
        db.set_measure(measure)
        builder = CandidateBuilder(tvm_target, cc=target.cross_cc, bundle_for=runner.qemu_triple)
        try:
            tuner = Tuner(target, db, builder, runner, trials=trials, per_round=per_round, seed=seed,
                          progress=progress, confirm=confirm, on_round=on_round, measure=measure)
            return tuner.tune(tasks)
        finally:
            builder.close()

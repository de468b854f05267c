"""The tuning database: MetaSchedule's JSON files, one folder per target triple.

    DIR/<triple>/database_workload.json       one workload (PrimFunc) per line
    DIR/<triple>/database_tuning_record.json  one measured candidate per line (trace, run_secs)
    DIR/<triple>/tasks.json                   per-task summary of the last run (default vs best)
    DIR/<triple>/measure.json                 what the run times are (board time, or estimated cycles)

MetaSchedule's ``JSONDatabase`` appends every committed record to the file at once, so a
run that is killed loses at most the line being written; but its loader aborts on any line
it cannot parse.  :func:`repair_database` therefore checks every line first, keeps the
good ones (re-numbering records when a workload line is lost), moves the bad ones to
``rejected.jsonl`` and warns once per file.  Failed candidates are stored too, with
``FAILED_SECS`` as their run time (MetaSchedule's own convention), so a resumed run does
not measure them again.  A candidate re-measured on purpose (the tuner's confirmation
rounds) has several records; its latency is the median of the repeats of its re-measurements,
and once any candidate of a workload was re-measured only re-measured candidates compete for
its best (:class:`Candidate`, :meth:`TuningDatabase.best`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lastbit.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SUMMARY = "tasks.json"
MEASURE = "measure.json"  # what the records' run times are: board time, or a cycle model's estimate
REJECTED = "rejected.jsonl"
FAILED_SECS = 1e10  # run time MetaSchedule stores for a candidate that failed to build or run


def latency_s(run_secs) -> float:
    """A candidate's latency: the median of its repeats (one slow repeat on a busy device
    must not decide), ``FAILED_SECS`` for a failed or empty record."""
    secs = sorted(float(s) for s in (run_secs or []))
    if not secs:
        return FAILED_SECS
    mid = len(secs) // 2
    return secs[mid] if len(secs) % 2 else (secs[mid - 1] + secs[mid]) / 2


def target_dir(root: "str | Path", triple: str) -> Path:
    """The folder holding one target's records (the triple, made a safe file name)."""
    return Path(root) / re.sub(r"[^A-Za-z0-9_.+-]", "_", triple)


@dataclass
class Candidate:
    """One distinct schedule of a workload and every record the database holds of it.

    A candidate with several records was re-measured on purpose (the tuner's confirmation
    rounds, side by side with the default).  Its first record is then left out of its
    latency: the search picked it *because* that record was the fastest of many noisy
    measurements, so it is biased low (the winner's curse); on a busy machine one lucky
    record made a schedule that was no faster than the default look 2x faster.
    """

    schedule: object  # tvm.s_tir.Schedule of the workload with this candidate's trace replayed
    records: list[list[float]]  # run_secs of each record, in commit order

    @property
    def re_measured(self) -> bool:
        return len(self.records) > 1

    @property
    def failed(self) -> bool:
        return any(latency_s(secs) >= FAILED_SECS for secs in self.records)

    @property
    def run_secs(self) -> list[float]:
        """The repeats its latency is the median of: those of its re-measurements when it has
        any, else of its one record; ``[FAILED_SECS]`` once any record failed."""
        if self.failed:
            return [FAILED_SECS]
        return [s for secs in self.records[1:] or self.records for s in secs]

    @property
    def latency_s(self) -> float:
        return latency_s(self.run_secs)


@dataclass
class RepairReport:
    """What :func:`repair_database` dropped: 1-based line numbers per file."""

    bad_workload_lines: list[int]
    bad_record_lines: list[int]

    @property
    def clean(self) -> bool:
        return not self.bad_workload_lines and not self.bad_record_lines


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


def repair_database(folder: "str | Path") -> RepairReport:
    """Drop every line MetaSchedule's loader would choke on, keeping all the others.

    A workload line must parse as MetaSchedule JSON into a module; a record line must name
    a kept workload and parse into a ``TuningRecord`` of it.  When something is dropped the
    files are rewritten atomically, the dropped lines are appended to ``rejected.jsonl`` and
    a warning names the file and line numbers.
    """
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    folder = Path(folder)
    workload_lines = _read_lines(folder / WORKLOADS)
    record_lines = _read_lines(folder / RECORDS)
    kept_workloads: list[str] = []
    workloads: list = []
    index_map: dict[int, int] = {}
    bad_w: list[int] = []
    rejected: list[str] = []
    ordinal = -1  # the loader numbers workloads by their order among non-empty lines
    for number, line in enumerate(workload_lines, 1):
        if not line.strip():
            continue
        ordinal += 1
        try:
            workload = Workload.from_json(json.loads(line))
        except Exception:  # malformed JSON, wrong shape, or TVM cannot parse the module
            bad_w.append(number)
            rejected.append(json.dumps({"file": WORKLOADS, "line": number, "text": line}))
            continue
        index_map[ordinal] = len(kept_workloads)
        kept_workloads.append(line)
        workloads.append(workload)
    kept_records: list[str] = []
    bad_r: list[int] = []
    for number, line in enumerate(record_lines, 1):
        if not line.strip():
            continue
        try:
            old_index, body = json.loads(line)
            new_index = index_map[int(old_index)]
            TuningRecord.from_json(body, workloads[new_index])
        except Exception:
            bad_r.append(number)
            rejected.append(json.dumps({"file": RECORDS, "line": number, "text": line}))
            continue
        kept_records.append(line if new_index == old_index else json.dumps([new_index, body]))
    report = RepairReport(bad_w, bad_r)
    if not report.clean:
        atomic_write_text(folder / WORKLOADS, "".join(f"{line}\n" for line in kept_workloads))
        atomic_write_text(folder / RECORDS, "".join(f"{line}\n" for line in kept_records))
        with open(folder / REJECTED, "a", encoding="utf-8") as sink:
            sink.write("".join(f"{line}\n" for line in rejected))
        if bad_w:
            log.warning("tuning database %s: skipped corrupt line(s) %s (moved to %s)",
                        folder / WORKLOADS, _ranges(bad_w), REJECTED)
        if bad_r:
            log.warning("tuning database %s: skipped corrupt line(s) %s (moved to %s)",
                        folder / RECORDS, _ranges(bad_r), REJECTED)
    return report


def _ranges(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers[:20]) + (f" and {len(numbers) - 20} more" if len(numbers) > 20 else "")


class TuningDatabase:
    """One target's records: MetaSchedule's ``JSONDatabase`` after :func:`repair_database`,
    plus the look-ups the tuner and the pipeline need."""

    def __init__(self, root: "str | Path", target) -> None:
        """``target`` is a lastbit ``Target`` (its triple names the folder)."""
        from tvm.s_tir import meta_schedule as ms

        self.target = target
        self.tvm_target = target.tvm()
        self.folder = target_dir(root, target.triple)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.repair = repair_database(self.folder)
        self.ms = ms.database.JSONDatabase(
            path_workload=str(self.folder / WORKLOADS),
            path_tuning_record=str(self.folder / RECORDS),
            allow_missing=True,
            module_equality="structural",
        )

    def __len__(self) -> int:
        return len(self.ms)

    def records(self, mod) -> list:
        """Every record of workload ``mod`` (failed ones included), in commit order."""
        import tvm_ffi

        if not self.ms.has_workload(mod):
            return []
        return [r for r in self.ms.get_all_tuning_records() if tvm_ffi.structural_equal(r.workload.mod, mod)]

    def candidates(self, mod) -> dict[int, Candidate]:
        """Every candidate of workload ``mod`` in the database, keyed by the structural hash of
        its scheduled module, with all its records (several only when it was re-measured on
        purpose: the tuner's confirmation rounds)."""
        import tvm_ffi
        from tvm import s_tir

        from lastbit.autotune.templates import register_intrinsics

        found: dict[int, Candidate] = {}
        records = self.records(mod)
        if records:
            register_intrinsics(mod)
        for record in records:
            try:
                sch = s_tir.Schedule(mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception as err:  # a record of an older template: not a candidate any more
                log.debug("record does not replay on its workload: %s", err)
                continue
            key = tvm_ffi.structural_hash(sch.mod)
            found.setdefault(key, Candidate(sch, [])).records.append([float(s) for s in record.run_secs])
        return found

    def measured(self, mod) -> dict[int, list[float]]:
        """Structural hash of each candidate already measured for ``mod`` -> the run_secs its
        latency is the median of (:attr:`Candidate.run_secs`), so a resumed run neither
        measures a candidate again nor forgets its result."""
        return {key: c.run_secs for key, c in self.candidates(mod).items()}

    def commit(self, mod, trace, run_secs: "list[float] | None", args_info=None) -> None:
        """Store one measured (or failed: ``run_secs`` None) candidate of workload ``mod``."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.database import TuningRecord

        workload = self.ms.commit_workload(mod)
        secs = [float(s) for s in run_secs] if run_secs else [FAILED_SECS]
        if args_info is None:
            args_info = ArgInfo.from_prim_func(mod["main"])
        self.ms.commit_tuning_record(
            TuningRecord(trace=trace, workload=workload, run_secs=secs, target=self.tvm_target, args_info=args_info)
        )

    def best(self, mod) -> "tuple[object, float] | None":
        """(Schedule, seconds) of the fastest successful candidate of ``mod``, or None: what
        ``compile --db`` applies.  Once any candidate was re-measured (the tuner confirms its
        winner against the default, alternating), only re-measured candidates compete: a
        candidate measured once was never compared with the default under the same load, and
        among many such the fastest record is mostly luck (:class:`Candidate`)."""
        contenders = [c for c in self.candidates(mod).values() if not c.failed]
        if any(c.re_measured for c in contenders):
            contenders = [c for c in contenders if c.re_measured]
        return _fastest(contenders)

    def fastest(self, mod) -> "tuple[object, float] | None":
        """(Schedule, seconds) of the fastest successful candidate by its own records,
        re-measured or not: what the search found, the one the tuner confirms."""
        return _fastest([c for c in self.candidates(mod).values() if not c.failed])

    def measure(self) -> str | None:
        """What the records' run times are (``tuner.measure_of``); a folder with records but
        no measure.json predates it and holds board time; None when empty."""
        path = self.folder / MEASURE
        if path.is_file():
            try:
                return str(json.loads(path.read_text())["measure"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; assuming board time", path)
        return "board time" if len(self) else None

    def set_measure(self, measure: str) -> None:
        atomic_write_json(self.folder / MEASURE, {"target": self.target.triple, "measure": measure})

    def write_summary(self, rows: list[dict]) -> Path:
        return atomic_write_json(self.folder / SUMMARY, {"target": self.target.triple, "tasks": rows})

    def read_summary(self) -> list[dict]:
        path = self.folder / SUMMARY
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("tasks", []))
        except (json.JSONDecodeError, AttributeError):
            log.warning("tuning summary %s is unreadable; ignoring it", path)
            return []


def _fastest(candidates: list[Candidate]) -> "tuple[object, float] | None":
    best = min(candidates, key=lambda c: c.latency_s, default=None)
    return None if best is None else (best.schedule, best.latency_s)


def apply_database(mod, root: "str | Path", target) -> "tvm.IRModule":  # noqa: F821
    """Schedule every PrimFunc of a lowered module that has a successful record in the
    database at ``root`` for ``target`` with its best record; the others stay as they are
    (the default scheduler then handles them).  Integer kernels, which the lowering already
    scheduled with their default, are re-scheduled from their unscheduled PrimFunc when the
    database has a record for it.  Returns a new module."""
    import tvm

    from lastbit.autotune.tasks import int_kernel_of, workload_of

    folder = target_dir(root, target.triple)
    if not (folder / WORKLOADS).is_file():
        log.warning("tuning database %s has no records for %s; using default schedules", root, target.triple)
        return mod
    db = TuningDatabase(root, target)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        is_kernel = int_kernel_of(func) is not None
        if not is_kernel and func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            continue
        found = db.best(workload_of(func))
        if found is None:
            continue
        sch, secs = found
        if is_kernel:  # keep the lowering's attributes (no global symbol, opaque to fusion, kernel + layer)
            tuned = sch.mod["main"].without_attr("global_symbol")
            for name, value in dict(func.attrs).items():
                tuned = tuned.with_attr(str(name), value)
            updates[gv] = tuned.with_attr("tirx.is_scheduled", True)
        else:
            updates[gv] = sch.mod["main"].with_attr("global_symbol", gv.name_hint).with_attr("tirx.is_scheduled", True)
        log.info("tuned schedule for %s (%.4f ms)", gv.name_hint, secs * 1e3)
    log.info("tuning database %s: %d of the module's functions tuned", folder, len(updates))
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod

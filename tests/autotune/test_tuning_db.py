"""The tuning database: MetaSchedule JSON per target, corrupt lines skipped with a warning,
and records applied at compile time (schedule changes, outputs stay right)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir

import lastbit
from lastbit.autotune.database import (
    FAILED_SECS,
    RECORDS,
    REJECTED,
    WORKLOADS,
    TuningDatabase,
    apply_database,
    latency_s,
    target_dir,
)
from lastbit.autotune.tasks import extract_tasks
from lastbit.autotune.templates import default_schedule, design_spaces
from lastbit.pipeline import import_model, lower
from lastbit.targets import get_target

HOST = get_target("x86_64-linux-gnu")


@pytest.fixture(scope="module")
def mlp_tasks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    graph = import_model(model, (x,))
    lowered = lower(graph, HOST)
    return model, x, lowered, extract_tasks(lowered, HOST.tvm())


def _other_candidates(task, count: int, seed: int = 3) -> list:
    """``count`` template candidates whose loops differ from the default schedule's and from
    each other's."""
    found = [default_schedule(task.mod, HOST.tvm())]
    for s in range(seed, seed + 200):
        for space in design_spaces(s_tir.Schedule(task.mod, seed=s), HOST.tvm()):
            if not any(tvm_ffi.structural_equal(space.mod, known.mod) for known in found):
                found.append(space)
                if len(found) == count + 1:
                    return found[1:]
    raise AssertionError(f"the template of {task.name} has fewer than {count} candidates besides the default")


def _other_candidate(task, seed: int = 3):
    """A template candidate whose loops differ from the default schedule's."""
    return _other_candidates(task, 1, seed)[0]


def _applied_body(applied, task):
    """The function ``apply_database`` left for ``task``, as the workload module it scheduled."""
    func = applied[applied.get_global_var(task.name)]
    assert bool(func.attrs["tirx.is_scheduled"])
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main").without_attr("tirx.is_scheduled")})


def test_latency_is_the_median_of_repeats():
    assert latency_s([3.0, 1.0, 2.0]) == 2.0
    assert latency_s([1.0, 9.0]) == 5.0
    assert latency_s([]) == FAILED_SECS and latency_s(None) == FAILED_SECS


def test_records_are_keyed_by_target(tmp_path, mlp_tasks):
    _, _, _, tasks = mlp_tasks
    task = next(t for t in tasks if t.tunable)
    db = TuningDatabase(tmp_path, HOST)
    db.commit(task.mod, default_schedule(task.mod, HOST.tvm()).trace, [2e-6, 2e-6])
    assert (target_dir(tmp_path, HOST.triple) / RECORDS).is_file()
    arm = TuningDatabase(tmp_path, get_target("aarch64-linux-gnu"))
    assert len(arm) == 0 and len(TuningDatabase(tmp_path, HOST)) == 1


def test_db_changes_schedule_and_outputs_stay_correct(tmp_path, mlp_tasks):
    model, x, lowered, tasks = mlp_tasks
    task = next(t for t in tasks if t.tunable)
    tuned = _other_candidate(task)
    db = TuningDatabase(tmp_path, HOST)
    db.commit(task.mod, default_schedule(task.mod, HOST.tvm()).trace, [5e-6])
    db.commit(task.mod, tuned.trace, [1e-6])  # the faster record wins
    db.commit(task.mod, default_schedule(task.mod, HOST.tvm()).trace, None)  # a failure never does

    applied = apply_database(lowered, tmp_path, HOST)
    assert tvm_ffi.structural_equal(_applied_body(applied, task), tuned.mod)

    art = lastbit.compile(model, example_inputs=(x,), db=tmp_path)
    default_art = lastbit.compile(model, example_inputs=(x,))
    assert not tvm_ffi.structural_equal(art.mod[task.name], default_art.mod[task.name])
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(art.run(x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_corrupt_lines_are_skipped_with_a_warning(tmp_path, mlp_tasks, caplog):
    _, _, _, tasks = mlp_tasks
    first, second = [t for t in tasks][:2]
    db = TuningDatabase(tmp_path, HOST)
    db.commit(first.mod, default_schedule(first.mod, HOST.tvm()).trace, [4e-6])
    db.commit(second.mod, default_schedule(second.mod, HOST.tvm()).trace, [3e-6])
    db.commit(second.mod, _other_candidate(second).trace if second.tunable else
              default_schedule(second.mod, HOST.tvm()).trace, [2e-6])
    del db
    folder = target_dir(tmp_path, HOST.triple)
    records = (folder / RECORDS).read_text().splitlines()
    assert len(records) == 3
    # A truncated record (a run killed mid-write) and a line of garbage between good ones.
    (folder / RECORDS).write_text("\n".join([records[0], records[1][: len(records[1]) // 2], "not json{",
                                             records[2]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lastbit.autotune.database"):
        reopened = TuningDatabase(tmp_path, HOST)
    assert reopened.repair.bad_record_lines == [2, 3]
    assert any("corrupt line(s) 2, 3" in r.getMessage() for r in caplog.records)
    assert len(reopened) == 2  # the other records survive
    assert reopened.best(second.mod)[1] == pytest.approx(2e-6)
    assert len((folder / REJECTED).read_text().splitlines()) == 2

    # A corrupt *workload* line: its records go, the records of later workloads are
    # renumbered and still attached to the right workload.
    workloads = (folder / WORKLOADS).read_text().splitlines()
    (folder / WORKLOADS).write_text("\n".join(["[\"broken\"", workloads[1]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lastbit.autotune.database"):
        again = TuningDatabase(tmp_path, HOST)
    assert again.repair.bad_workload_lines == [1]
    assert again.best(first.mod) is None
    assert again.best(second.mod)[1] == pytest.approx(2e-6)
    kept = [json.loads(line) for line in (folder / RECORDS).read_text().splitlines()]
    assert {index for index, _ in kept} == {0}


def test_re_measured_candidate_is_judged_by_its_re_runs(tmp_path, mlp_tasks):
    """Confirmation rounds add records to the search's winner and the default, alternating;
    the winner's first record (the luckiest of the search) no longer counts, so a winner
    that only looked fast once loses to the default."""
    _, _, _, tasks = mlp_tasks
    task = next(t for t in tasks if t.tunable)
    default, other = default_schedule(task.mod, HOST.tvm()), _other_candidate(task)
    db = TuningDatabase(tmp_path, HOST)
    db.commit(task.mod, default.trace, [5e-6] * 5)
    db.commit(task.mod, other.trace, [1e-6] * 5)  # looked fast once
    assert tvm_ffi.structural_equal(db.best(task.mod)[0].mod, other.mod)
    db.commit(task.mod, default.trace, [5e-6] * 5)  # one confirmation round: it is not faster
    db.commit(task.mod, other.trace, [6e-6] * 5)  # (pooled with its first record: median 3.5e-6)
    sch, secs = db.best(task.mod)
    assert tvm_ffi.structural_equal(sch.mod, default.mod) and secs == pytest.approx(5e-6)
    assert db.measured(task.mod)[tvm_ffi.structural_hash(other.mod)] == [6e-6] * 5
    assert len(db.measured(task.mod)) == 2  # two candidates, four records


def test_a_candidate_measured_once_never_beats_confirmed_ones(tmp_path, mlp_tasks):
    """After the confirmation rounds demote the search's winner, the runner-up (measured once,
    never side by side with the default) must not take its place: compile --db applies the
    default.  Before, it did, and a model "tuned" 1.5x per task ran no faster."""
    _, _, lowered, tasks = mlp_tasks
    task = next(t for t in tasks if t.tunable)
    default = default_schedule(task.mod, HOST.tvm())
    winner, runner_up = _other_candidates(task, 2)
    db = TuningDatabase(tmp_path, HOST)
    db.commit(task.mod, default.trace, [5e-6])
    db.commit(task.mod, winner.trace, [1e-6])
    db.commit(task.mod, runner_up.trace, [2e-6])
    assert tvm_ffi.structural_equal(db.fastest(task.mod)[0].mod, winner.mod)  # what the tuner confirms
    for _ in range(3):
        db.commit(task.mod, default.trace, [5e-6])
        db.commit(task.mod, winner.trace, [9e-6])
    sch, secs = db.best(task.mod)
    assert tvm_ffi.structural_equal(sch.mod, default.mod) and secs == pytest.approx(5e-6)
    assert tvm_ffi.structural_equal(_applied_body(apply_database(lowered, tmp_path, HOST), task), default.mod)

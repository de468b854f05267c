"""``lastbit tune`` end to end on loopback: local and farm tuning, the database applied at
compile time, Ctrl-C then --resume, a bad candidate injected, an unreachable tracker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm_ffi
from autotune_helpers import build_artifact, spin_kernel
from click.testing import CliRunner

import lastbit
from lastbit.autotune import runner as runner_module
from lastbit.autotune.database import FAILED_SECS, RECORDS, SUMMARY, target_dir
from lastbit.autotune.farm import FarmError, free_port
from lastbit.autotune.tuner import TuneError, tune_model
from lastbit.cli import main as cli_main

TRIPLE = "x86_64-linux-gnu"


def _records(db_dir) -> list:
    path = target_dir(db_dir, TRIPLE) / RECORDS
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tune_locally_then_compile_with_db(tmp_path, tiny_mlp):
    model, x = tiny_mlp
    result = tune_model(model, TRIPLE, tmp_path, trials=3, per_round=2, example_inputs=(x,), progress=False,
                        confirm=0)
    tunable = [t for t in result.tasks if t.tunable]
    assert tunable and all(t.measured == 3 for t in tunable)  # the default and 2 candidates
    assert all(t.best_ms is not None and t.best_ms <= t.default_ms for t in result.tasks)
    table = result.format_table()
    assert "default ms" in table and tunable[0].name[:20] in table
    summary = json.loads((target_dir(tmp_path, TRIPLE) / SUMMARY).read_text())
    assert [t["name"] for t in summary["tasks"]] == [t.name for t in result.tasks]

    art = lastbit.compile(model, example_inputs=(x,), db=tmp_path)
    np.testing.assert_allclose(art.run(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tune_over_tracker_uses_both_workers(farm, tmp_path, tiny_mlp):
    model, x = tiny_mlp
    result = tune_model(model, TRIPLE, tmp_path, trials=6, per_round=4, example_inputs=(x,), tracker=farm.tracker,
                        key=farm.key, progress=False)
    assert len(result.stats.devices) == 2
    assert result.stats.measured == sum(t.measured for t in result.tasks) and result.stats.failed == 0


@pytest.mark.slow
def test_interrupt_then_resume_measures_no_candidate_twice(farm, tmp_path, tiny_mlp, monkeypatch):
    model, x = tiny_mlp
    built: list[list[int]] = [[]]
    original = runner_module.CandidateBuilder.build

    def spy(self, mods):
        built[-1].extend(tvm_ffi.structural_hash(m) for m in mods)
        return original(self, mods)

    monkeypatch.setattr(runner_module.CandidateBuilder, "build", spy)

    def ctrl_c(task, done):
        raise KeyboardInterrupt

    options = dict(trials=4, per_round=2, example_inputs=(x,), tracker=farm.tracker, key=farm.key, progress=False,
                   confirm=0)  # confirmation re-measures default and best: not new candidates
    with pytest.raises(KeyboardInterrupt):
        tune_model(model, TRIPLE, tmp_path, on_round=ctrl_c, **options)
    first_run = len(_records(tmp_path))
    assert first_run >= 2 and first_run == len(built[0])

    with pytest.raises(TuneError, match="--resume"):
        tune_model(model, TRIPLE, tmp_path, **options)

    built.append([])
    result = tune_model(model, TRIPLE, tmp_path, resume=True, **options)
    assert built[1], "the resumed run measured nothing new"
    assert not set(built[0]) & set(built[1])
    assert len(_records(tmp_path)) == first_run + len(built[1])
    assert sum(t.reused for t in result.tasks) >= first_run


@pytest.mark.slow
def test_bad_candidate_is_marked_failed_and_tuning_goes_on(farm, tmp_path, tiny_mlp, monkeypatch):
    model, x = tiny_mlp
    hang = build_artifact(spin_kernel(1 << 62), tmp_path, "hang")
    original = runner_module.FarmRunner.measure
    injected = []

    def inject(self, artifacts, on_result=None, count=True):
        if len(artifacts) >= 2 and count and not injected:  # the first round of the search
            injected.append(artifacts[0])
            artifacts = [hang] + list(artifacts[1:])
        return original(self, artifacts, on_result, count)

    monkeypatch.setattr(runner_module.FarmRunner, "measure", inject)
    result = tune_model(model, TRIPLE, tmp_path / "db", trials=4, per_round=2, example_inputs=(x,),
                        tracker=farm.tracker, key=farm.key, progress=False, timeout_s=3)
    assert injected
    assert sum(t.failed for t in result.tasks) == 1 and result.stats.timed_out == 1
    assert any(body[1] == [FAILED_SECS] for _, body in _records(tmp_path / "db"))
    assert all(t.best_ms is not None for t in result.tasks)  # every task still tuned


def test_unreachable_tracker_writes_nothing(tmp_path, tiny_mlp):
    model, x = tiny_mlp
    port = free_port()
    with pytest.raises(FarmError, match=f"127.0.0.1:{port}"):
        tune_model(model, TRIPLE, tmp_path / "db", trials=2, example_inputs=(x,), tracker=f"127.0.0.1:{port}",
                   key="nobody", progress=False)
    assert not (tmp_path / "db").exists()


def test_cli_farm_status_lists_the_workers(farm):
    out = CliRunner().invoke(cli_main, ["farm", "status", "--tracker", farm.tracker])
    assert out.exit_code == 0, out.output
    (line,) = [row for row in out.output.splitlines() if row.startswith("test ")]
    assert line.split()[1] == "2" and line.count("127.0.0.1:") == 2


@pytest.mark.slow
def test_cli_tune_then_compile_with_db(farm, tmp_path):
    db = str(tmp_path / "db")
    tune = CliRunner().invoke(cli_main, ["tune", "mlp", "--untrained", "--trials", "2", "--db", db,
                                         "--tracker", farm.tracker, "--key", farm.key])
    assert tune.exit_code == 0, tune.output
    assert "default ms" in tune.output and "tuned ms" in tune.output
    compiled = CliRunner().invoke(cli_main, ["compile", "mlp", "--untrained", "--db", db, "-o", str(tmp_path / "out")])
    assert compiled.exit_code == 0, compiled.output
    assert (tmp_path / "out" / "manifest.json").is_file()
    usage = CliRunner().invoke(cli_main, ["tune", "mlp", "--db", db, "--tracker", farm.tracker])
    assert usage.exit_code == 2 and "--key" in usage.output


def test_tuner_docstring_describes_the_search_it_runs():
    """The module says what ``Tuner._search`` does: sampled templates ranked by XGBoost,
    not MetaSchedule's EvolutionarySearch (which the tuner never uses)."""
    import inspect

    from lastbit.autotune import tuner

    doc = tuner.__doc__
    assert "XGBoost" in doc and "samples" in doc
    assert "EvolutionarySearch" not in doc and "evolutionary search and" not in doc
    assert "EvolutionarySearch" not in inspect.getsource(tuner).replace(doc, "")


class _ScriptedBuilder:
    """Builds nothing: a candidate's "artifact" names its scheduled module's structural hash."""

    def __init__(self, folder):
        self.folder = folder

    def build(self, mods):
        return [(str(self.folder / str(tvm_ffi.structural_hash(m))), None) for m in mods]


class _LuckyFirstRunner:
    """A busy machine in miniature: the default runs 5 ms every time; every other candidate's
    first run looks fast (1.0 ms, 1.1 ms, ... in the order measured) and re-runs take 9 ms."""

    deterministic = False

    def __init__(self, default_key: int):
        self.default_key = default_key
        self.seen: list[int] = []
        self.stats = runner_module.MeasureStats()

    def measure(self, artifacts, on_result=None, count=True):
        results = []
        for i, (path, _) in enumerate(artifacts):
            key = int(path.rsplit("/", 1)[-1])
            if key == self.default_key:
                secs = 5e-3
            elif key in self.seen:
                secs = 9e-3
            else:
                secs = 1e-3 + 1e-4 * len(self.seen)
                self.seen.append(key)
            m = runner_module.Measurement(run_secs=[secs] * 3)
            if on_result is not None:
                on_result(i, m)
            results.append(m)
        return results


def test_confirmation_that_demotes_the_winner_leaves_the_default(tmp_path, tiny_mlp):
    """The search's winner is confirmed against the default and turns out slower: the task
    reports no gain and the database's best is the default schedule.  Before, the runner-up
    (measured once, luckily) became the best and the table claimed a 4.5x speed-up."""
    from lastbit.autotune.database import TuningDatabase
    from lastbit.autotune.tasks import extract_tasks
    from lastbit.autotune.templates import default_schedule
    from lastbit.autotune.tuner import Tuner
    from lastbit.pipeline import import_model, lower
    from lastbit.targets import get_target

    model, x = tiny_mlp
    target = get_target(TRIPLE)
    task = next(t for t in extract_tasks(lower(import_model(model, (x,)), target), target.tvm()) if t.tunable)
    default = default_schedule(task.mod, target.tvm())
    runner = _LuckyFirstRunner(tvm_ffi.structural_hash(default.mod))
    db = TuningDatabase(tmp_path, target)
    tuner = Tuner(target, db, _ScriptedBuilder(tmp_path), runner, trials=5, per_round=2, progress=False, confirm=3)
    (result,) = tuner.tune([task]).tasks
    assert len(runner.seen) >= 2  # a winner and at least one runner-up were measured once
    assert result.default_ms == pytest.approx(5.0) and result.best_ms == pytest.approx(5.0)
    assert tvm_ffi.structural_equal(db.best(task.mod)[0].mod, default.mod)

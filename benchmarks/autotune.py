"""Autotuning: tuned vs default per task (fp32 and 3-bit ResNet-18), whole models with and without the DB, farm throughput.

Part 1 tunes the heaviest tasks of fp32 ResNet-18 with a modest trial budget on a private
loopback worker, and reports each task's default and best latency from the same run, then
the same tasks' functions timed inside the model compiled with and without the database
(the VM's per-function timing; ``schedule_changed`` says whether the database replaced the
default schedule) and the whole model both ways: a per-task gain the model does not show is
a measurement artefact of the tuner, not a speed-up (docs/AUTOTUNE.md, "Reading the
numbers").  Part 1b does the same for the integer kernels of ResNet-18 quantized with
``Squeeze(bits=3)`` (tasks of kind ``int:<kernel>``: the kernel's default schedule against
the best of its ``tuning_space``); the default and the best are re-measured alternately
(the tuner's confirmation rounds) because the machine is shared.  The host's own strategy
serves conv2d with ``reference-int``, which has no tuning space, so part 1b tunes a variant
of the host target whose conv2d strategy is the kernels that have one (``int8-vnni-conv``
where VNNI exists, else ``int8``) and compares whole models three ways: the host as
shipped, the variant with its defaults, the variant tuned.  Part 2 measures the same
candidate set through farms of 1, 2 and 3 single-threaded workers and reports measurements
per second relative to one worker (the issue's goal: >= 0.8 N x).  On a machine with C
cores the speed-up cannot pass C (every worker measures on a core).  ``--skip-fp32`` /
``--fp32-only`` run a subset; the parts not run keep the last run's numbers
(``meta.parts_run`` says which ran).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _task_functions(module, example, model_name: str, task_names: list[str]) -> dict[str, list[str]]:
    """The model's function names each task serves: a task is one distinct PrimFunc, which
    the model may call under several names (its ``weight`` counts all the calls)."""
    import tvm
    import tvm_ffi

    from lastbit.autotune.tasks import workload_of
    from lastbit.pipeline import import_model, lower
    from lastbit.targets import get_target

    lowered = lower(import_model(module, (example,), name=model_name), get_target("x86_64-linux-gnu"))
    workloads = {gv.name_hint: workload_of(f) for gv, f in lowered.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc)}
    return {name: [other for other, wl in workloads.items() if tvm_ffi.structural_equal(wl, workloads[name])]
            for name in task_names}


def _same_schedule(a, b) -> bool:
    """Whether two scheduled PrimFuncs have the same loops (the database's copy of a schedule
    carries other attributes than the default scheduler's)."""
    import tvm_ffi

    def loops(func):
        return func.without_attr("global_symbol").without_attr("tirx.is_scheduled")

    return bool(tvm_ffi.structural_equal(loops(a), loops(b)))


def tune_part(model_name: str, trials: int, max_tasks: int, repeat: int) -> dict:
    """Tuned vs default per task as the tuner measured them, the same tasks' functions timed
    inside the compiled model with and without the database, and the whole model."""
    import lastbit
    from lastbit.autotune.tuner import tune_model
    from lastbit.frontend.models import get_model

    module, example = get_model(model_name, pretrained=False)  # latency does not depend on weights
    db_dir = Path(tempfile.mkdtemp(prefix="lastbit-bench-db-"))
    try:
        start = time.perf_counter()
        result = tune_model(module, "x86_64-linux-gnu", db_dir, trials=trials, per_round=8, example_inputs=(example,),
                            name=model_name, max_tasks=max_tasks, progress=False)
        tune_s = time.perf_counter() - start
        print(result.format_table(), flush=True)
        x = example.numpy()
        default_art = lastbit.compile(module, example_inputs=(example,), name=model_name)
        tuned_art = lastbit.compile(module, example_inputs=(example,), name=model_name, db=db_dir)
        # Interleaved rounds, median of each: the machine's load drifts between two long runs.
        default_runs, tuned_runs = [], []
        profiles: dict[str, list[dict]] = {"default": [], "tuned": []}
        for _ in range(5):
            default_runs.append(default_art.latency_ms(x, repeat=repeat))
            tuned_runs.append(tuned_art.latency_ms(x, repeat=repeat))
            profiles["default"].append(default_art.function_times_ms(x, runs=repeat))
            profiles["tuned"].append(tuned_art.function_times_ms(x, runs=repeat))
        default_ms, tuned_ms = float(np.median(default_runs)), float(np.median(tuned_runs))
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    functions = _task_functions(module, example, model_name, [t.name for t in result.tasks])
    tasks = []
    for t in result.tasks:
        # The task's time in one call of the model (all its calls), median over the rounds.
        in_model = {k: float(np.median([sum(p.get(n, 0.0) for n in functions[t.name]) for p in rounds]))
                    for k, rounds in profiles.items()}
        changed = any(not _same_schedule(default_art.mod[n], tuned_art.mod[n]) for n in functions[t.name])
        tasks.append(dict(t.to_json(), speedup=t.speedup, functions=functions[t.name], schedule_changed=changed,
                          in_model_default_ms=in_model["default"], in_model_tuned_ms=in_model["tuned"],
                          in_model_speedup=in_model["default"] / in_model["tuned"]))
    in_model_default = sum(t["in_model_default_ms"] for t in tasks)
    in_model_tuned = sum(t["in_model_tuned_ms"] for t in tasks)
    return {
        "model": model_name,
        "precision": "fp32",
        "trials_per_task": trials,
        "tasks_tuned": len(tasks),
        "tune_s": round(tune_s, 1),
        "tasks": tasks,
        "tuned_tasks_sum_default_ms": result.model_ms("default"),
        "tuned_tasks_sum_best_ms": result.model_ms("best"),
        "tuned_tasks_in_model_default_ms": in_model_default,
        "tuned_tasks_in_model_tuned_ms": in_model_tuned,
        "tuned_tasks_in_model_speedup": in_model_default / in_model_tuned,
        "model_default_ms": default_ms,
        "model_tuned_ms": tuned_ms,
        "model_default_rounds_ms": default_runs,
        "model_tuned_rounds_ms": tuned_runs,
        "model_speedup": default_ms / tuned_ms,
    }


def _time_split(art, x: np.ndarray) -> dict:
    """One call's time in the integer kernels (what tuning moves; with their quantize and
    epilogue where the kernel is fused) and in everything else, from the VM's per-call timing."""
    from lastbit.codegen.quant_lowering import KERNEL_ATTR

    kernels = {gv.name_hint for gv, f in art.mod.functions_items() if f.attrs is not None and KERNEL_ATTR in f.attrs}
    times = art.function_times_ms(x, runs=10)
    in_kernels = sum(ms for name, ms in times.items() if name in kernels)
    other = sorted(((ms, name) for name, ms in times.items() if name not in kernels), reverse=True)
    return {"integer_kernels": in_kernels, "other": sum(ms for ms, _ in other),
            "kernel_share": in_kernels / sum(times.values()), "top_other": {name: ms for ms, name in other[:5]}}


def int_part(model_name: str, trials: int, max_tasks: int, repeat: int, confirm: int, model_rounds: int = 5) -> dict:
    """Integer-kernel tasks of the 3-bit model: default vs tuned per task, whole models."""
    import dataclasses

    import lastbit
    from lastbit.autotune.tuner import tune_model
    from lastbit.frontend.models import get_model
    from lastbit.squeeze import Squeeze
    from lastbit.targets import get_target

    host = get_target("x86_64-linux-gnu")
    tunable_convs = ("int8-vnni-conv", "int8")  # the first whose supports() accepts the layer wins
    variant = dataclasses.replace(host, kernels={**host.kernels, "conv2d": tunable_convs})
    module, example = get_model(model_name, pretrained=False)  # latency does not depend on weights
    squeeze = Squeeze(bits=3)
    db_dir = Path(tempfile.mkdtemp(prefix="lastbit-bench-intdb-"))
    try:
        start = time.perf_counter()
        result = tune_model(module, variant, db_dir, trials=trials, per_round=8, example_inputs=(example,),
                            squeeze=squeeze, name=model_name, max_tasks=max_tasks, progress=False, confirm=confirm,
                            integer_only=True)
        tune_s = time.perf_counter() - start
        print(result.format_table(), flush=True)
        x = example.numpy()
        arts = {
            "shipped": lastbit.compile(module, host, (example,), name=model_name, squeeze=squeeze),
            "variant_default": lastbit.compile(module, variant, (example,), name=model_name, squeeze=squeeze),
            "variant_tuned": lastbit.compile(module, variant, (example,), name=model_name, squeeze=squeeze,
                                             db=db_dir),
        }
        outputs = {k: a.run(x) for k, a in arts.items()}
        rounds: dict[str, list[float]] = {k: [] for k in arts}
        for _ in range(model_rounds):  # interleaved rounds, median of each: the load drifts between long runs
            for k, art in arts.items():
                rounds[k].append(art.latency_ms(x, repeat=repeat))
        split = {k: _time_split(arts[k], x) for k in ("variant_default", "variant_tuned")}
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    medians = {k: float(np.median(v)) for k, v in rounds.items()}
    tasks = [dict(t.to_json(), speedup=t.speedup) for t in result.tasks]
    roofline = _roofline(arts["variant_default"], tasks, medians["variant_default"],
                         split["variant_default"]["kernel_share"])
    speedups = [t["speedup"] for t in tasks if t["speedup"]]
    return {
        "model": model_name,
        "precision": "Squeeze(bits=3), integer kernels",
        "conv2d_kernels_tuned": list(tunable_convs),
        "conv2d_kernels_shipped": list(host.kernels.get("conv2d", ())),
        "trials_per_task": trials,
        "confirm_rounds": confirm,
        "tasks_tuned": len(tasks),
        "tune_s": round(tune_s, 1),
        "tasks": tasks,
        "task_speedup_geomean": float(np.exp(np.mean(np.log(speedups)))) if speedups else None,
        "task_speedup_min": min(speedups) if speedups else None,
        "task_speedup_max": max(speedups) if speedups else None,
        "tuned_tasks_sum_default_ms": result.model_ms("default"),
        "tuned_tasks_sum_best_ms": result.model_ms("best"),
        "tuned_tasks_sum_speedup": (result.model_ms("default") / result.model_ms("best")
                                    if result.model_ms("default") and result.model_ms("best") else None),
        "tuned_output_bit_identical": bool(np.array_equal(outputs["variant_tuned"], outputs["variant_default"])),
        "model_ms": medians,
        "model_time_split_ms": split,
        "model_rounds_ms": rounds,
        "model_tuned_vs_variant_default": medians["variant_default"] / medians["variant_tuned"],
        "model_tuned_vs_shipped": medians["shipped"] / medians["variant_tuned"],
        "roofline": roofline,
    }


def _roofline(art, tasks: list[dict], model_ms: float, kernel_share: float) -> dict:
    """How close the kernels are to the host's vpdpbusd peak (a register-only loop: an upper
    bound no schedule passes), per task (default and best) and for the whole model, and so the
    most any schedule of these kernels could give the model, and what the 1.3x tuned-over-default
    goal would ask."""
    from lastbit.autotune.roofline import RooflineError, host_vnni_peak_gmacs, model_kernel_macs, tuning_bound

    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    try:
        peak = host_vnni_peak_gmacs(threads)
    except RooflineError as err:
        return {"skipped": str(err)}
    for task in tasks:  # the tuner's result carries each integer task's MACs
        for which in ("default", "best"):
            if task.get("macs") and task[f"{which}_ms"]:
                task[f"{which}_fraction_of_peak"] = task["macs"] / task[f"{which}_ms"] / 1e6 / peak
    total = model_kernel_macs(art.mod)
    # Generous to tuning: the whole model counted as kernel time (the VM's per-call timing puts
    # its own hook overhead in the rest); beside it, the bound with the measured split.
    whole = tuning_bound(model_ms, model_ms, total, peak)
    split = tuning_bound(model_ms, kernel_share * model_ms, total, peak)
    return {"peak_gmacs": peak, "threads": threads, "model_kernel_macs": total, "model_ms": model_ms,
            "model_fraction_of_peak": whole["kernel_fraction_of_peak"],
            "max_model_speedup": whole["max_model_speedup"],
            "max_model_speedup_measured_split": split["max_model_speedup"], "kernel_share": kernel_share,
            # a 1.3x faster model at peak-bound kernels: the fraction of peak the model would run at
            "goal_1.3x_fraction_of_peak": 1.3 * whole["kernel_fraction_of_peak"]}


def farm_part(candidates: int, worker_counts: tuple[int, ...]) -> dict:
    """Measurements per second through farms of N single-threaded loopback workers."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.script import tirx as T

    from lastbit.autotune.farm import LocalFarm
    from lastbit.autotune.runner import FarmRunner

    iterations = 5 * 10**7  # ~0.1-0.2 s of a dependent multiply-add chain per run

    @T.prim_func(s_tir=True)
    def work(a: T.Buffer((1,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in T.serial(T.int64(iterations)):
            with T.sblock("acc"):
                T.axis.opaque(T.int64(iterations), i)
                a[0] = a[0] * T.float32(0.999) + T.float32(1.0)

    tmp = Path(tempfile.mkdtemp(prefix="lastbit-bench-farm-"))
    try:
        path = str(tmp / "work.so")
        tvm.tirx.build(tvm.IRModule({"main": work}), target="llvm").export_library(path)
        args = [a.as_json() for a in ArgInfo.from_prim_func(work)]
        rows = []
        for workers in worker_counts:
            with LocalFarm(workers=workers, key=f"bench{workers}", threads=1) as farm:
                runner = FarmRunner(farm.host, farm.port, farm.key, timeout_s=60, number=1, repeat=2,
                                    min_repeat_ms=0)
                runner.measure([(path, args)] * workers)  # warm every worker once
                start = time.perf_counter()
                results = runner.measure([(path, args)] * candidates)
                wall = time.perf_counter() - start
            ok = sum(r.ok for r in results)
            rows.append({"workers": workers, "measurements": ok, "wall_s": round(wall, 2),
                         "per_s": ok / wall, "devices_used": len({r.device for r in results if r.ok})})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["per_s"]
    for row in rows:
        row["speedup_vs_1"] = row["per_s"] / base
        row["goal_0.8N"] = 0.8 * row["workers"]
    return {"cores": os.cpu_count(), "candidates": candidates, "rows": rows}


def _print_fp32(model: str, tuned: dict) -> None:
    nan = float("nan")
    for t in tuned["tasks"]:
        print(f"  {t['name']}: tuner {(t['default_ms'] or nan) * t['weight']:.2f} -> "
              f"{(t['best_ms'] or nan) * t['weight']:.2f} ms ({t['speedup'] or nan:.2f}x), in the model "
              f"{t['in_model_default_ms']:.2f} -> {t['in_model_tuned_ms']:.2f} ms ({t['in_model_speedup']:.2f}x; "
              f"schedule {'changed' if t['schedule_changed'] else 'unchanged'})", flush=True)
    print(f"{model}: tuned tasks, tuner {tuned['tuned_tasks_sum_default_ms']:.2f} -> "
          f"{tuned['tuned_tasks_sum_best_ms']:.2f} ms, in the model {tuned['tuned_tasks_in_model_default_ms']:.2f} -> "
          f"{tuned['tuned_tasks_in_model_tuned_ms']:.2f} ms ({tuned['tuned_tasks_in_model_speedup']:.2f}x); "
          f"whole model default {tuned['model_default_ms']:.2f} ms, tuned {tuned['model_tuned_ms']:.2f} ms "
          f"({tuned['model_speedup']:.2f}x)", flush=True)


def _print_int(model: str, integer: dict) -> None:
    ms, nan = integer["model_ms"], float("nan")
    print(f"{model} 3-bit integer kernels: per-task tuned/default geomean "
          f"{integer['task_speedup_geomean'] or nan:.2f}x (min {integer['task_speedup_min'] or nan:.2f}, "
          f"max {integer['task_speedup_max'] or nan:.2f}); whole model shipped {ms['shipped']:.2f} ms, "
          f"variant default {ms['variant_default']:.2f} ms, variant tuned {ms['variant_tuned']:.2f} ms; "
          f"bit-identical {integer['tuned_output_bit_identical']}", flush=True)
    roof = integer.get("roofline", {})
    if "peak_gmacs" in roof:
        print(f"  roofline: vpdpbusd peak {roof['peak_gmacs']:.0f} GMAC/s on {roof['threads']} threads; the whole "
              f"model runs at {roof['model_fraction_of_peak']:.0%} of it, so retuning its kernels could give at most "
              f"{roof['max_model_speedup']:.2f}x ({roof['max_model_speedup_measured_split']:.2f}x if the time outside "
              f"them stays); 1.3x needs the model at {roof['goal_1.3x_fraction_of_peak']:.0%} of peak", flush=True)
    for k, part in integer["model_time_split_ms"].items():
        print(f"  {k}: integer kernels {part['integer_kernels']:.2f} ms ({part['kernel_share']:.0%}), "
              f"other {part['other']:.2f} ms (top: {', '.join(f'{n} {v:.2f}' for n, v in part['top_other'].items())})",
              flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks, trials and candidates")
    parser.add_argument("--model", default="resnet18")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--skip-fp32", action="store_true", help="only the integer-kernel part and the farm")
    parts.add_argument("--fp32-only", action="store_true",
                       help="only the fp32 part; the integer part and the farm keep the last run's numbers")
    parser.add_argument("--model-rounds", type=int, default=None,
                        help="interleaved whole-model timing rounds of the integer part (default 5; more on a loaded machine)")
    args = parser.parse_args(argv)
    import json

    from results import RESULTS, update_section

    logging.basicConfig(level=logging.WARNING)
    trials, max_tasks, repeat, candidates = (6, 3, 4, 12) if args.quick else (32, 8, 10, 30)
    int_trials, int_tasks, confirm = (8, 3, 2) if args.quick else (24, 12, 3)
    # A part not run keeps the numbers of the last run that ran it.
    previous = json.loads(RESULTS.read_text()).get("autotune", {}) if RESULTS.is_file() else {}
    tuned, integer, farm = previous.get("tuning"), previous.get("tuning_int"), previous.get("farm")
    if not args.skip_fp32:
        tuned = tune_part(args.model, trials, max_tasks, repeat)
        _print_fp32(args.model, tuned)
    if not args.fp32_only:
        integer = int_part(args.model, int_trials, int_tasks, repeat, confirm, args.model_rounds or 5)
        _print_int(args.model, integer)
        farm = farm_part(candidates, (1, 2, 3))
        for row in farm["rows"]:
            print(f"farm {row['workers']} worker(s): {row['per_s']:.2f} measurements/s "
                  f"({row['speedup_vs_1']:.2f}x of one; goal {row['goal_0.8N']:.1f}x)", flush=True)
    parts_run = [name for name, ran in (("tuning", not args.skip_fp32), ("tuning_int", not args.fp32_only),
                                        ("farm", not args.fp32_only)) if ran]
    data = {"meta": {"host": platform.processor() or platform.machine(), "quick": args.quick,
                     "load_avg_1min": os.getloadavg()[0], "parts_run": parts_run},
            "tuning": tuned, "tuning_int": integer, "farm": farm}
    update_section("autotune", data)
    return data


if __name__ == "__main__":
    main()

"""ARM tuning without a board: ResNet-20 3-bit conv tasks on aarch64+dotprod, default vs tuned estimated cycles.

``lastbit tune`` on ``aarch64-dotprod-linux-gnu`` with no tracker measures every candidate on
the qemu device (``autotune/qemu_device.py``): the candidate is cross-compiled, run under
qemu-user, its instructions per call counted and costed by the Cortex-A76 cycle model
(``targets/arm_cycle_model.py``). Every number here is that **cycle model on qemu
instruction counts, not a board**. Per conv task (integer kernels of the quantized layers):
the default schedule's estimate against the best of the kernel's tuning space, from the
same run; then the whole model compiled without and with the database, both counted under
qemu the same way, and whether their outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = "aarch64-dotprod-linux-gnu"
LABEL = "cycle model, qemu counts, not a board"


def model_cycles(artifact, x: np.ndarray, core: str, workdir: Path) -> dict:
    """Instructions and estimated cycles of one inference of a compiled model under qemu."""
    from lastbit.codegen.qemu_count import count_bundle

    counts = count_bundle(artifact.export(workdir), [x])
    return {"insns": counts.total, "cycles": float(counts.cycles(core))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and tasks")
    parser.add_argument("--model", default="resnet20")
    args = parser.parse_args(argv)
    from results import update_section

    import lastbit
    from lastbit.autotune.qemu_device import cycle_core
    from lastbit.autotune.tuner import tune_model
    from lastbit.frontend.models import get_model
    from lastbit.squeeze import Squeeze

    logging.basicConfig(level=logging.WARNING)
    trials, max_tasks = (4, 2) if args.quick else (16, None)
    module, example = get_model(args.model, pretrained=False)  # the counts do not depend on the weights
    squeeze = Squeeze(bits=3)
    core = cycle_core(TARGET)
    db_dir = Path(tempfile.mkdtemp(prefix="lastbit-bench-armdb-"))
    try:
        start = time.perf_counter()
        result = tune_model(module, TARGET, db_dir, trials=trials, per_round=8, example_inputs=(example,),
                            squeeze=squeeze, name=args.model, max_tasks=max_tasks, progress=False,
                            integer_only=True)
        tune_s = time.perf_counter() - start
        print(result.format_table(), flush=True)
        x = example.numpy()
        default = lastbit.compile(module, TARGET, (example,), name=args.model, squeeze=squeeze)
        tuned = lastbit.compile(module, TARGET, (example,), name=args.model, squeeze=squeeze, db=db_dir)
        whole = {"default": model_cycles(default, x, core, db_dir / "default"),
                 "tuned": model_cycles(tuned, x, core, db_dir / "tuned")}
        identical = bool(np.array_equal(default.run(x), tuned.run(x)))
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    tasks = [dict(t.to_json(), default_cycles=t.default_ms * 1e6 if t.default_ms else None,
                  tuned_cycles=t.best_ms * 1e6 if t.best_ms else None, speedup=t.speedup) for t in result.tasks]
    convs = [t for t in tasks if t["kind"] == "int:int8-sdot"]
    speedups = [t["speedup"] for t in convs if t["speedup"]]
    conv_default = sum(t["default_cycles"] * t["weight"] for t in convs if t["default_cycles"])
    conv_tuned = sum(t["tuned_cycles"] * t["weight"] for t in convs if t["tuned_cycles"])
    data = {
        "meta": {"quick": args.quick, "measure": LABEL, "core": core, "target": TARGET},
        "model": args.model,
        "precision": "Squeeze(bits=3), integer kernels",
        "trials_per_task": trials,
        "tune_s": round(tune_s, 1),
        "tasks": tasks,
        "conv_tasks": len(convs),
        "conv_speedup_geomean": float(np.exp(np.mean(np.log(speedups)))) if speedups else None,
        "conv_speedup_min": min(speedups) if speedups else None,
        "conv_speedup_max": max(speedups) if speedups else None,
        "conv_sum_default_cycles": conv_default,
        "conv_sum_tuned_cycles": conv_tuned,
        "conv_sum_speedup": conv_default / conv_tuned if conv_tuned else None,
        "whole_model": whole,
        "model_speedup": whole["default"]["cycles"] / whole["tuned"]["cycles"],
        "tuned_output_bit_identical": identical,
    }
    print(f"{args.model} 3-bit on {TARGET} ({LABEL}, {core}): {len(convs)} sdot conv tasks, tuned/default "
          f"geomean {data['conv_speedup_geomean'] or float('nan'):.2f}x (min {data['conv_speedup_min'] or float('nan'):.2f}, "
          f"max {data['conv_speedup_max'] or float('nan'):.2f}), sum {data['conv_sum_speedup'] or float('nan'):.2f}x; "
          f"whole model {whole['default']['cycles']:.0f} -> {whole['tuned']['cycles']:.0f} cycles "
          f"({data['model_speedup']:.2f}x); bit-identical {identical}; tuning {tune_s:.0f} s", flush=True)
    update_section("autotune_arm", data)
    return data


if __name__ == "__main__":
    main()

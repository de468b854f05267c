"""Compile time per model, phase by phase (import, squeeze, lower+schedule, build), for the
host target; and the weight projection against the pre-fast-search implementation on the
same rows in the same run.  Writes bench/results.json section "compile_time".

Models (issue 15's goals): one 8192×8192 Linear on int8 codes (≤ 10 s), ResNet-18 at 3 bits
(≤ 20 s), a 7-layer 4096-wide MLP at 3 bits (≤ 30 s).  --quick compiles smaller versions.
One-time module imports (torch.export, TVM: seconds) are paid by an untimed warm-up compile
first, as in any session that compiles more than once; the first compile's extra is recorded
separately.  Wall-clock times depend on the machine's load (recorded with each run).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

# the old projection, kept beside the tests that compare against it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "passes"))

GOALS_S = {"linear8192-int8": 10.0, "resnet18-3bit": 20.0, "mlp7x4096-3bit": 30.0}


def _linear(width: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width)).eval(), torch.randn(1, width)


def _mlp(width: int, layers: int = 7):
    import torch

    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).eval(), torch.randn(1, width)


def _zoo(name: str):
    from lastbit.frontend.models import get_model

    return get_model(name, pretrained=False)  # compile time does not depend on the weights' training


def cases(quick: bool) -> list[tuple[str, object, int]]:
    """(name, builder, bits) per model; bits 8 = int8 codes on every layer."""
    if quick:
        return [("linear2048-int8", lambda: _linear(2048), 8), ("resnet20-3bit", lambda: _zoo("resnet20"), 3),
                ("mlp7x1024-3bit", lambda: _mlp(1024), 3)]
    return [("linear8192-int8", lambda: _linear(8192), 8), ("resnet18-3bit", lambda: _zoo("resnet18"), 3),
            ("mlp7x4096-3bit", lambda: _mlp(4096), 3)]


def compile_phases(module, example, bits: int) -> dict[str, float]:
    """Seconds per phase of one compile for the host, as ``lastbit.compile`` + first run does it."""
    import lastbit
    from lastbit.pipeline import build_vm, compile_graph, import_model

    start, cpu_start = time.perf_counter(), time.process_time()
    graph = import_model(module, (example,))
    imported = time.perf_counter()
    compiled = compile_graph(graph, "x86_64-linux-gnu", squeeze=lastbit.Squeeze(bits=bits), torch_module=module)
    lowered = time.perf_counter()
    build_vm(compiled.mod, compiled.target)
    built = time.perf_counter()
    phases = {"import": imported - start, **compiled.phase_s, "build": built - lowered}
    phases["total"] = built - start
    # this process's CPU seconds (TVM's build threads included): on a busy machine, closer
    # than the wall time to what a quiet one takes
    phases["total_cpu"] = time.process_time() - cpu_start
    return {k: round(v, 3) for k, v in phases.items()}


def projection_speedup(quick: bool) -> list[dict]:
    """The same rows projected by the old (row by row, every breakpoint / every start on the
    data) and the new implementation: a load-independent ratio."""
    from pow2_projection_reference import project_pow2_reference

    from lastbit.passes.pow2_projection import project_pow2, projection_error

    rng = np.random.default_rng(0)
    rows = 16 if quick else 128  # 128×8192 int8 is past the direct-scan size: the sorted-row path
    out = []
    for codes, width in (("int8", 8192), ("pow2-4", 4096), ("ternary", 4096)):
        w = (rng.standard_normal((rows, width)) * 0.02).astype(np.float32)
        t0 = time.process_time()
        q_old, a_old = project_pow2_reference(w, codes, axis=0)
        t1 = time.process_time()
        q_new, a_new = project_pow2(w, codes, axis=0)
        t2 = time.process_time()
        out.append({"codes": codes, "shape": [rows, width], "old_cpu_s": round(t1 - t0, 3),
                    "new_cpu_s": round(t2 - t1, 3), "speedup": round((t1 - t0) / max(t2 - t1, 1e-9), 1),
                    "error_ratio_new_over_old": projection_error(w, q_new, a_new) / projection_error(w, q_old, a_old)})
    return out


def large_tensor_cap(quick: bool) -> dict:
    """What capping the int8 alternation on large tensors costs: projection error with the
    default cap vs run to convergence, and vs plain max-abs scaling, on the benchmark's widest
    Linear (quick: a 2048² one, forced onto the large-tensor path)."""
    import lastbit.passes.pow2_projection as pp

    width = 2048 if quick else 8192
    w = _linear(width)[0][0].weight.detach().numpy()
    saved = pp._LARGE_TENSOR_ELEMENTS, pp._LARGE_TENSOR_ROUNDS, pp._OVER_RELAX
    errors = {}
    try:
        pp._LARGE_TENSOR_ELEMENTS = min(saved[0], w.size)
        # "plain_100": the paper's alternation without over-relaxation, 100 rounds
        for name, rounds, relax in (("capped", saved[1], saved[2]), ("converged", 1000, saved[2]),
                                    ("plain_100", 100, 1.0)):
            pp._LARGE_TENSOR_ROUNDS, pp._OVER_RELAX = rounds, relax
            errors[name] = pp.projection_error(w, *pp.project_pow2(w, "int8", axis=0))
    finally:
        pp._LARGE_TENSOR_ELEMENTS, pp._LARGE_TENSOR_ROUNDS, pp._OVER_RELAX = saved
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    errors["max_abs"] = pp.projection_error(w, np.clip(np.round(w / scale), -127, 127), scale)
    return {"shape": list(w.shape), "rounds": saved[1], **{f"error_{k}": v for k, v in errors.items()},
            "capped_over_converged": errors["capped"] / errors["converged"],
            "capped_over_max_abs": errors["capped"] / errors["max_abs"],
            "capped_over_plain_100": errors["capped"] / errors["plain_100"]}


def main(argv=None) -> dict:
    from results import model_bench_args, update_section

    args = model_bench_args(argv, __doc__.splitlines()[0])
    warm_start = time.perf_counter()
    compile_phases(*_linear(64), 3)  # pays the one-time imports (torch.export, TVM)
    first_compile_s = time.perf_counter() - warm_start
    rows = []
    for name, build, bits in cases(args.quick):
        if args.models and name not in args.models:
            continue
        module, example = build()
        phases = compile_phases(module, example, bits)
        goal = GOALS_S.get(name)
        rows.append({"model": name, "bits": bits, "params": int(sum(p.numel() for p in module.parameters())),
                     "phase_s": phases, "goal_s": goal})
        shown = "  ".join(f"{k} {v:.1f}" for k, v in phases.items() if k not in ("total", "total_cpu"))
        print(f"{name:<16} {phases['total']:>7.1f} s, CPU {phases['total_cpu']:.1f} s  ({shown})" + (f"  goal ≤ {goal:.0f} s" if goal else ""))
    speedups = projection_speedup(args.quick)
    for row in speedups:
        print(f"projection {row['codes']:<8} {row['shape']}: old {row['old_cpu_s']:.2f} s, new {row['new_cpu_s']:.2f} s "
              f"CPU ({row['speedup']:.0f}x), error new/old {row['error_ratio_new_over_old']:.6f}")
    cap = large_tensor_cap(args.quick)
    print(f"int8 {cap['shape']} capped at {cap['rounds']} rounds: error ×{cap['capped_over_converged']:.5f} of the "
          f"converged search, ×{cap['capped_over_plain_100']:.5f} of 100 plain rounds, ×{cap['capped_over_max_abs']:.4f} "
          "of max-abs scaling")
    data = {"quick": args.quick, "first_compile_s": round(first_compile_s, 2), "load_avg_1min": os.getloadavg()[0],
            "cpus": os.cpu_count(), "rows": rows, "projection": speedups, "large_tensor_cap": cap}
    update_section("compile_time", data)
    return data


if __name__ == "__main__":
    main()

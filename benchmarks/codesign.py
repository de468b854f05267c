"""Co-design search on ResNet-8 (Fashion-MNIST) for the x86 host: the searched per-layer configuration against the best uniform setting at equal accuracy.

The search (lastbit/codesign.py) measures a share of the per-layer choices on this host
(cached in ~/.cache/lastbit/codesign-costs.json, so a rerun measures nothing new), predicts
the rest with the XGBoost cost model, measures single-layer loss changes on 512 train
samples and solves the knapsack for the least latency within ``--max-drop`` points of
predicted drop. Then every configuration — the searched one and the uniform baselines of
issue 13 (int8 everywhere; 3-bit pow2-4 with first/last int8; that plus 30 % pruning) — is
compiled the same way (pruning/low-rank applied to the torch module, then ADMM fine-tuning
onto its code sets for one epoch on a train slice; --quick: data-free projection), scored on
test images and timed whole on one TVM thread, interleaved over rounds (min of medians), in
one run.

Goals (issue 13): at accuracy within 0.3 pt of the best uniform setting (the fastest uniform
one within --max-drop of fp32), ≥ 1.3× lower latency; cost-model Spearman ≥ 0.9 on held-out
measured choices; search ≤ 15 min with cached measurements. Honest either way: timings on
a shared, loaded machine are noisy and should be re-taken on a quiet one.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np

MODEL = "resnet8"
HOST = "x86_64-linux-gnu"
# Layers and whole models are timed on one TVM thread: on this shared 2-core machine a
# 2-thread pool stalls for milliseconds on a descheduled worker (lastbit/codesign_cost.py).
THREADS = 1


def _latencies(artifacts: dict, x: np.ndarray, rounds: int, repeat: int) -> dict[str, float]:
    """Whole-model latency of each artifact, interleaved round by round so load hits all alike;
    the least median over rounds (load only adds time)."""
    times: dict[str, list[float]] = {k: [] for k in artifacts}
    for _ in range(rounds):
        for k, art in artifacts.items():
            times[k].append(art.latency_ms(x, repeat=repeat, warmup=2))
    return {k: float(min(v)) for k, v in times.items()}


def main(argv=None) -> dict:
    import torch

    from lastbit.codesign import CODES, finetune_config, run_codesign, uniform_configs
    from lastbit.codesign_cost import tvm_threads
    from lastbit.frontend.datasets import fashion_mnist
    from lastbit.frontend.models import get_model
    from lastbit.frontend.training import cache_dir
    from lastbit.pipeline import import_model
    from results import update_section

    import lastbit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer measurements and choices, no fine-tuning")
    parser.add_argument("--max-drop", type=float, default=1.0, help="predicted accuracy drop budget (points)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "bench" / "codesign"),
                        help="folder for config.json, pareto.json/png (default bench/codesign)")
    parser.add_argument("--untrained", action="store_true", help="seeded random weights: a smoke run, nothing recorded")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    module, example = get_model(MODEL, pretrained=not args.untrained)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    rng = np.random.default_rng(0)
    n_cal, n_tune, n_test = (256, 0, 1000) if args.quick else (512, 2000, 3000)
    pick = rng.choice(len(train.labels), n_cal + n_tune, replace=False)
    calibration = (train.images[pick[:n_cal]], train.labels[pick[:n_cal]])
    tune = (train.images[pick[n_cal:]], train.labels[pick[n_cal:]]) if n_tune else calibration[0]
    test_data = (test.images[:n_test], test.labels[:n_test])
    codes = ("ternary", "pow2-4", "int8", "fp32") if args.quick else CODES

    start = time.perf_counter()
    result = run_codesign(module, example, HOST, calibration, args.out, objective="latency", max_drop=args.max_drop,
                          cache_path=cache_dir().parent / "codesign-costs.json",
                          measure_share=0.35, max_measure=30 if args.quick else None, codes=codes,
                          ranks=not args.quick, name=MODEL)
    search_s = time.perf_counter() - start
    if result.chosen is None:
        raise SystemExit(f"no configuration within {args.max_drop} points of predicted drop")

    graph = import_model(module, (example,), name=MODEL)
    configs = {**uniform_configs(result.sites), "searched": result.chosen.config}
    artifacts, accuracy, compile_s = {}, {}, {}
    fp32 = lastbit.compile(module, HOST, (example,), name=MODEL)
    artifacts["fp32"] = fp32
    accuracy["fp32"] = fp32.accuracy(test_data)
    for label, config in configs.items():
        t0 = time.perf_counter()
        art = finetune_config(module, example, graph, config, tune, HOST, epochs=1, name=MODEL)
        compile_s[label] = time.perf_counter() - t0
        artifacts[label], accuracy[label] = art, art.accuracy(test_data)
        print(f"{label:<28} top-1 {accuracy[label]:.2%} ({compile_s[label]:.0f} s to squeeze and compile)")
    with tvm_threads(THREADS):
        latency = _latencies(artifacts, example.numpy(), rounds=5 if args.quick else 9, repeat=20)

    uniform = [k for k in configs if k.startswith("uniform")]
    eligible = [k for k in uniform if accuracy["fp32"] - accuracy[k] <= args.max_drop / 100] or uniform
    best_uniform = min(eligible, key=lambda k: latency[k])
    equal_accuracy = accuracy["searched"] >= accuracy[best_uniform] - 0.003
    speedup = latency[best_uniform] / latency["searched"]
    scores = result.cost_scores.get("latency_ms", {})
    rows = [{"config": k, "top1": accuracy[k], "latency_ms": latency[k],
             "weight_bytes": (artifacts[k].report().model_bytes),
             "predicted_drop": (result.chosen.drop if k == "searched" else
                                result.uniform[k].drop if k in result.uniform else 0.0)} for k in artifacts]
    for row in rows:
        print(f"{row['config']:<28} top-1 {row['top1']:.2%}  {row['latency_ms']:.4f} ms  "
              f"{row['weight_bytes'] / 1e3:7.1f} KB  predicted drop {row['predicted_drop']:.2f} pt")
    print(f"best uniform: {best_uniform}; searched is {speedup:.2f}x faster "
          f"({'equal accuracy' if equal_accuracy else 'NOT within 0.3 pt'}; goal 1.3x)")
    print(f"cost model held-out Spearman {scores.get('spearman', float('nan')):.3f} (goal 0.9), "
          f"R² {scores.get('r2', float('nan')):.3f} ({scores.get('folds', 0)}-fold cross-validated over "
          f"{scores.get('points', 0)} measured choices); "
          f"search {search_s:.0f} s (measuring {result.timings['measure']:.0f} s, sensitivity "
          f"{result.timings['sensitivity']:.0f} s, knapsack + front {result.timings['search']:.1f} s)")
    data = {
        "quick": args.quick, "model": MODEL, "target": HOST, "max_drop": args.max_drop,
        "fine_tune": f"ADMM 1 epoch on {n_tune} train samples" if n_tune else "data-free projection",
        "test_samples": n_test, "threads": THREADS, "rows": rows, "best_uniform": best_uniform,
        "speedup_vs_best_uniform": speedup, "equal_accuracy": bool(equal_accuracy),
        "cost_model": result.cost_scores, "measured_points": result.measured_points,
        "predicted_points": result.predicted_points, "search_s": search_s, "timings_s": result.timings,
        "chosen": result.chosen.config.to_dict()["layers"], "pareto_points": len(result.front),
        "compile_s": compile_s,
    }
    if not args.untrained:
        update_section("codesign", data)
    return data


if __name__ == "__main__":
    main()

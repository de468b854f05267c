"""`make bench`: every benchmark of the repo, one after another, each writing into bench/."""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accel_dse  # noqa: E402
import admm_budget  # noqa: E402
import accel_sim  # noqa: E402
import admm_sweep  # noqa: E402
import arm_insn_count  # noqa: E402
import autotune_arm  # noqa: E402
import bitserial_arm  # noqa: E402
import codesign  # noqa: E402
import compile_time  # noqa: E402
import conv_vnni  # noqa: E402
import datafree_accuracy  # noqa: E402
import gemv_lowbit  # noqa: E402
import prune_latency  # noqa: E402
import quant_accuracy  # noqa: E402
import quant_e2e  # noqa: E402
import zoo_latency  # noqa: E402

import autotune  # noqa: E402 - benchmarks/autotune.py (first on sys.path), not the package

BENCHMARKS = [
    zoo_latency,
    admm_sweep,
    quant_accuracy,
    admm_budget,
    datafree_accuracy,
    accel_sim,
    accel_dse,
    gemv_lowbit,
    prune_latency,
    quant_e2e,
    conv_vnni,
    arm_insn_count,
    compile_time,
    bitserial_arm,
    autotune,
    autotune_arm,
    codesign,
]
# Runs beyond the quick set: the full-train-split accuracy table, the one from a longer-trained
# fp32 model, ResNet-20's STE vs ADMM on two more seeds, the BatchNorm nets at two lower
# learning rates and with one α per output channel, and EfficientNet-Lite0's data-free pipeline on
# more calibration images (their own sections).
FULL_ONLY = [(quant_accuracy, ["--full-train"]), (quant_accuracy, ["--trained-fp32"]),
             (quant_accuracy, ["--seeds", "1", "2"]), (quant_accuracy, ["--lrs", "0.005", "0.0025"]),
             (quant_accuracy, ["--per-channel"]), (datafree_accuracy, ["--calibration-counts"])]


def main() -> None:
    # torch 2.13's pytree and ONNX exporter warn about their own internals on every export.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models, fewer repeats")
    args = parser.parse_args()
    runs = [(bench, ["--quick"] if args.quick else []) for bench in BENCHMARKS]
    for bench, argv in runs + ([] if args.quick else FULL_ONLY):
        print(f"== {bench.__name__} {' '.join(argv)}: {bench.__doc__.splitlines()[0]}")
        bench.main(argv)


if __name__ == "__main__":
    main()

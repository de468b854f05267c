"""`make bench`: every benchmark of the repo, one after another, each writing into bench/."""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quant_accuracy  # noqa: E402
import zoo_latency  # noqa: E402

BENCHMARKS = [zoo_latency, quant_accuracy]


def main() -> None:
    # torch 2.13's pytree and ONNX exporter warn about their own internals on every export.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models, fewer repeats")
    args = parser.parse_args()
    for bench in BENCHMARKS:
        print(f"== {bench.__name__}: {bench.__doc__.splitlines()[0]}")
        bench.main(["--quick"] if args.quick else [])


if __name__ == "__main__":
    main()

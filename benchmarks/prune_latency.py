"""Pruned and low-rank artifacts against the unpruned one: latency, FLOPs and params, plus the combined sparsity + power-of-two compression figure.

Every variant of a model is compiled for the host and timed in the same run
(``Artifact.latency_ms``), interleaved over three rounds, so the ratios are comparable even
on a loaded machine. Pruning
uses the L1 criterion on the zoo's seeded weights (latency does not depend on which channels
go); low-rank uses a FLOP budget ("flops:0.5": each split layer at most half its FLOPs), since
random weights have no low-rank structure for an energy threshold to find. The compression
figure (seed 000: 82× on AlexNet at 3 bits and 90% sparsity) is the report's own arithmetic
on the squeezed graph: codes in the cheapest of dense / bitmap / run-length encodings. Last,
the compiled resnet20 (trained on Fashion-MNIST) is scored unpruned, pruned by half with
each criterion, and pruned then fine-tuned for one epoch on a slice of the train split.
"""

from __future__ import annotations

import time

import numpy as np

QUICK_MODELS = ("resnet20", "mlp")
FULL_MODELS = ("resnet20", "mlp", "mobilenetv2", "resnet18")
VARIANTS = {
    "unpruned": {},
    "prune-0.3": {"prune": 0.3},
    "prune-0.5": {"prune": 0.5},
    "lowrank-flops0.5": {"rank": "flops:0.5"},
}


def bench_model(name: str, repeat: int, rounds: int = 3) -> list[dict]:
    """Compile every variant, then time them interleaved for ``rounds`` rounds (the median
    round counts), so load from other processes hits all variants alike."""
    import lastbit
    from lastbit.frontend.models import get_model

    module, example = get_model(name, pretrained=False)
    x = example.numpy()
    rows, artifacts = [], []
    for variant, options in VARIANTS.items():
        start = time.perf_counter()
        squeeze = lastbit.Squeeze(**options) if options else None
        artifact = lastbit.compile(module, "x86_64-linux-gnu", (example,), name=name, squeeze=squeeze)
        artifact.run(x)
        report = artifact.report()
        artifacts.append(artifact)
        rows.append({
            "model": name,
            "variant": variant,
            "params": report.params,
            "mflops": report.flops / 1e6,
            "compile_s": round(time.perf_counter() - start, 2),
        })
    per_round = max(1, repeat // rounds)
    times: list[list[float]] = [[] for _ in artifacts]
    for _ in range(rounds):
        for i, artifact in enumerate(artifacts):
            times[i].append(artifact.latency_ms(x, repeat=per_round))
    for row, samples in zip(rows, times):
        row["latency_ms"] = float(np.median(samples))
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = row["mflops"] / base["mflops"]
        row["params_ratio"] = row["params"] / base["params"]
        row["speedup_vs_unpruned"] = base["latency_ms"] / row["latency_ms"]
    return rows


def compression_figure(name: str, bits: int = 3, sparsity: float = 0.9) -> dict:
    """Squeeze ``name`` with sparsity + pow2 codes (the default pipeline: first/last layers at
    int8) and read the report's sparse-aware storage size."""
    from lastbit.frontend.models import get_model
    from lastbit.pipeline import import_model, squeeze_passes
    from lastbit.report import build_report
    from lastbit.squeeze import Squeeze

    module, example = get_model(name, pretrained=False)
    graph = import_model(module, (example,), name=name)
    for squeeze_pass in squeeze_passes(Squeeze(bits=bits, sparsity=sparsity)):
        graph = squeeze_pass(graph)
    report = build_report(graph, "x86_64-linux-gnu")
    return {
        "model": name,
        "bits": bits,
        "sparsity": sparsity,
        "fp32_bytes": report.fp32_bytes,
        "dense_codes_bytes": report.model_bytes,
        "encoded_bytes": report.encoded_bytes,
        "compression_codes_only": report.compression,
        "compression_sparse_codes": report.encoded_compression,
    }


def accuracy_rows(quick: bool) -> list[dict]:
    """Top-1 of the compiled resnet20 (trained on Fashion-MNIST) unpruned, pruned by a quarter,
    by half with each criterion, and by half then fine-tuned for one epoch on a slice of the
    train split."""
    import lastbit
    from lastbit.frontend.datasets import fashion_mnist
    from lastbit.frontend.models import get_model

    module, example = get_model("resnet20", pretrained=True)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    n_train, n_test = (4000, 2000) if quick else (20000, 10000)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train.labels), n_train, replace=False)
    data = (train.images[pick], train.labels[pick])
    test_data = (test.images[:n_test], test.labels[:n_test])
    variants = {
        "unpruned": None,
        "prune-0.25 l1": lastbit.Squeeze(prune=0.25),
        "prune-0.5 l1": lastbit.Squeeze(prune=0.5),
        "prune-0.5 bn": lastbit.Squeeze(prune=0.5, prune_criterion="bn"),
        "prune-0.5 taylor": lastbit.Squeeze(prune=0.5, prune_criterion="taylor", data=data),
        "prune-0.5 l1 + 1 epoch": lastbit.Squeeze(prune=0.5, prune_epochs=1, data=data, lr=0.01),
    }
    rows = []
    for variant, squeeze in variants.items():
        artifact = lastbit.compile(module, "x86_64-linux-gnu", (example,), name="resnet20", squeeze=squeeze)
        rows.append({"model": "resnet20", "variant": variant, "top1": artifact.accuracy(test_data),
                     "test_samples": n_test, "finetune_samples": n_train if "epoch" in variant else 0})
    return rows


def main(argv=None) -> dict:
    from results import model_bench_args, update_section

    args = model_bench_args(argv, __doc__.splitlines()[0])
    names = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    repeat = args.repeat or (10 if args.quick else 30)
    rows = []
    for name in names:
        for row in bench_model(name, repeat):
            rows.append(row)
            print(f"{row['model']:<12} {row['variant']:<17} {row['params']:>10,} params "
                  f"{row['mflops']:>9.2f} MFLOPs ({row['flops_ratio']:.2f}x) {row['latency_ms']:>8.3f} ms "
                  f"({row['speedup_vs_unpruned']:.2f}x vs unpruned)")
    figure = compression_figure("resnet20" if args.quick else "vgg11")
    print(f"{figure['model']}: {figure['bits']}-bit codes + {figure['sparsity']:.0%} sparsity -> "
          f"{figure['compression_sparse_codes']:.1f}x smaller than fp32 "
          f"(codes alone {figure['compression_codes_only']:.1f}x)")
    accuracy = accuracy_rows(args.quick)
    for row in accuracy:
        print(f"{row['model']:<12} {row['variant']:<24} top-1 {row['top1']:.2%} on {row['test_samples']} test images")
    data = {"quick": args.quick, "repeat": repeat, "rows": rows, "compression": figure, "accuracy": accuracy}
    update_section("prune_latency", data)
    return data


if __name__ == "__main__":
    main()

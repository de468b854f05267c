"""Batch-1 latency of every zoo model: lastbit (host target) vs PyTorch eager fp32 vs
onnxruntime fp32, measured in one process run.  Writes bench/results.json and a PNG."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from results import median_ms

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench"
QUICK_MODELS = ("lenet5", "resnet20", "mlp", "ffn")


def onnx_session(module, example):
    import onnxruntime as ort
    import torch

    buf = io.BytesIO()
    torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, repeat: int) -> dict:
    import torch

    import lastbit
    from lastbit.frontend.models import get_model

    # Latency does not depend on the weights: skip training the small models first.
    module, example = get_model(name, pretrained=(name == "efficientnet-lite0"))
    start = time.perf_counter()
    artifact = lastbit.compile(module, "x86_64-linux-gnu", (example,), name=name)
    x = example.numpy()
    out = artifact.run(x)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = module(example).numpy()
    rel_err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
    session = onnx_session(module, example)
    with torch.no_grad():
        torch_ms = median_ms(lambda: module(example), repeat)
    ort_ms = median_ms(lambda: session.run(None, {"x": x}), repeat)
    lastbit_ms = artifact.latency_ms(x, repeat=repeat)
    report = artifact.report()
    return {
        "model": name,
        "params": report.params,
        "gflops": report.flops / 1e9,
        "compile_s": round(compile_s, 2),
        "max_rel_err_vs_torch": rel_err,
        "lastbit_ms": lastbit_ms,
        "torch_eager_ms": torch_ms,
        "onnxruntime_ms": ort_ms,
        "speedup_vs_torch": torch_ms / lastbit_ms,
        "speedup_vs_onnxruntime": ort_ms / lastbit_ms,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    for i, (key, label) in enumerate([("lastbit_ms", "lastbit"), ("torch_eager_ms", "torch eager"), ("onnxruntime_ms", "onnxruntime")]):
        ax.bar(xs + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(xs, names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("batch-1 latency, ms (log)")
    ax.set_title("fp32 latency on this host (lower is better)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    from lastbit.fileio import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> list[dict]:
    import torch
    from results import model_bench_args, update_section

    from lastbit.frontend.models import ZOO

    args = model_bench_args(argv, __doc__)
    names = args.models or (QUICK_MODELS if args.quick else tuple(ZOO))
    repeat = args.repeat or (10 if args.quick else 30)
    rows = []
    for name in names:
        row = bench_model(name, repeat)
        rows.append(row)
        print(
            f"{name:<18} lastbit {row['lastbit_ms']:8.3f} ms | torch {row['torch_eager_ms']:8.3f} ms "
            f"({row['speedup_vs_torch']:.2f}x) | onnxruntime {row['onnxruntime_ms']:8.3f} ms "
            f"({row['speedup_vs_onnxruntime']:.2f}x) | err {row['max_rel_err_vs_torch']:.1e}",
            flush=True,
        )
    import platform

    import lastbit

    meta = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "lastbit": lastbit.__version__, "batch": 1}
    update_section("zoo_latency", {"meta": meta, "rows": rows})
    plot(rows, OUT_DIR / "zoo_latency.png")
    return rows


if __name__ == "__main__":
    main()

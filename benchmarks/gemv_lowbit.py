"""Low-bit GEMV 8192×8192 (batch 1 and 64): lastbit integer kernels vs torch fp32 and onnxruntime
fp32 / dynamic int8, in one run, plus measured read bandwidth. Writes bench/results.json.

Every engine computes the same layer: the float engines get W = α·codes (fp32), onnxruntime
int8 gets that W through ``quantize_dynamic``; the lastbit kernels get the codes themselves,
packed (lut: 3-bit pow2-4; shift-add: 3-bit pow2-4; bitserial: 2-bit ternary; int8-vnni: int8
codes). The lastbit kernels compute the int32 accumulators from int8 activations; quantizing
the 8192-element input and the one-multiply epilogue are separate ops of a few µs, not timed.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

log = logging.getLogger("gemv_lowbit")
THREADS = 2
CACHE_BYTES = 32 << 20  # last-level cache here (L3, 32 MiB)


def read_bandwidth_gbs(size_bytes: int, repeat: int) -> float:
    """Best streaming read rate over a buffer much larger than the caches (torch sum, 2 threads)."""
    import torch

    buf = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


def onnx_matmul(weight_kn: np.ndarray) -> bytes:
    """An ONNX model y = x @ W with W [K, N] as an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight_kn, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def ort_sessions(weight_kn: np.ndarray, tmp_dir) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = tmp_dir / "gemv.onnx", tmp_dir / "gemv_int8.onnx"
    fp32_path.write_bytes(onnx_matmul(weight_kn))
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see interleaved_ms
    opts.log_severity_level = 3
    return {
        "onnxruntime_fp32": ort.InferenceSession(str(fp32_path), opts, providers=["CPUExecutionProvider"]),
        "onnxruntime_int8": ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"]),
    }


def lastbit_kernels(batch: int, n: int, k: int, rng) -> list[tuple[str, str, np.ndarray]]:
    """(kernel, code set, codes) measured at this batch size."""
    from lastbit.passes.pow2_projection import code_set

    pow2 = rng.choice(code_set("pow2-4").levels, size=(n, k)).astype(np.int8)
    ternary = rng.choice(code_set("ternary").levels, size=(n, k)).astype(np.int8)
    int8 = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    cases = [("lut", "pow2-4", pow2), ("bitserial", "ternary", ternary), ("int8-vnni", "int8", int8)]
    if batch == 1:  # per-element shifts lose at large batch (TVM-NOTES); not worth minutes here
        cases.insert(1, ("shift-add", "pow2-4", pow2))
    return cases


def interleaved_ms(engines: dict, repeat: int, number: int, warmup: int = 3) -> dict[str, float]:
    """Median per engine of the mean time of ``number`` calls, the engines taking turns in
    every repeat, so a machine whose load changes during the run shifts all of them alike.
    Each turn starts with ``warmup`` untimed calls: the previous engine's worker threads
    (OpenMP, onnxruntime, TVM) spin for a while after it returns and would steal the cores."""
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeat):
        for name, fn in engines.items():
            for _ in range(warmup):
                fn()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            runs[name].append((time.perf_counter() - start) / number)
    return {name: float(np.median(times) * 1e3) for name, times in runs.items()}


def bench_batch(batch: int, n: int, k: int, repeat: int, number: int, tmp_dir) -> dict:
    import torch

    from lastbit.codegen.kernels import IntLayer, get_kernel
    from lastbit.codegen.kernels.common import build_for_host
    from lastbit.codegen.quant_reference import int_dense
    from lastbit.passes.pow2_projection import code_set
    from lastbit.targets import get_target

    rng = np.random.default_rng(batch)
    rows: dict[str, dict] = {}
    engines: dict = {}
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x_q = rng.integers(-127, 128, size=(batch, k), dtype=np.int8)

    kernel_cases = lastbit_kernels(batch, n, k, rng)
    alpha = np.float32(0.01)
    weight = kernel_cases[0][2].astype(np.float32) * alpha  # the float engines run the pow2 layer
    torch.set_num_threads(THREADS)
    xt, wt = torch.from_numpy(x), torch.from_numpy(weight)

    def torch_linear() -> None:
        with torch.inference_mode():
            torch.nn.functional.linear(xt, wt)

    engines["torch_fp32"] = torch_linear
    for name, session in ort_sessions(np.ascontiguousarray(weight.T), tmp_dir).items():
        engines[name] = lambda s=session: s.run(None, {"x": x})

    for kernel_name, cs, codes in kernel_cases:
        kernel = get_kernel(kernel_name)
        layer = IntLayer("dense", cs, code_set(cs).bits, (batch, k), (n, k))
        label = f"lastbit_{kernel_name}_{cs}"
        reason = kernel.supports(layer, get_target("x86_64-linux-gnu").feature_set())
        if reason is not None:  # e.g. no AVX-512 VNNI on this machine
            rows[label] = {"skipped": reason}
            continue
        start = time.perf_counter()
        built = build_for_host(kernel, layer, codes)
        build_s = time.perf_counter() - start
        packed_bytes = int(sum(a.numpy().nbytes for a in built.packed))
        rows[label] = {
            "bit_exact": bool(np.array_equal(built(x_q), int_dense(x_q, codes))),
            "packed_bytes": packed_bytes,
            "build_s": round(build_s, 1),
            # weights left in L3 by the previous call (the peers' 64-256 MB never fit)
            "warm_cache_ms": built.time_ms(x_q, number=number, repeat=repeat),
        }
        # "ms": calls rotate over copies of the weights, so each reads them from memory
        engines[label] = built.rotating_call(x_q, CACHE_BYTES)
        log.info("batch %d: built %s in %.1f s", batch, kernel_name, build_s)

    for name, ms in interleaved_ms(engines, repeat, number).items():
        rows.setdefault(name, {})["ms"] = ms
        if "packed_bytes" in rows[name]:
            rows[name]["packed_gbs"] = rows[name]["packed_bytes"] / ms / 1e6
    ref = rows["torch_fp32"]["ms"]
    ort_int8 = rows["onnxruntime_int8"]["ms"]
    for row in rows.values():
        if "ms" not in row:
            continue
        row["speedup_vs_torch_fp32"] = ref / row["ms"]
        row["speedup_vs_ort_int8"] = ort_int8 / row["ms"]
    return {name: rows[name] for name in sorted(rows, key=lambda r: ("ms" not in rows[r], not r.startswith(("torch", "onnx"))))}


def main(argv: list[str] | None = None) -> dict:
    import tempfile
    from pathlib import Path

    from results import update_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096×4096, fewer repeats")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = k = 4096 if args.quick else 8192
    repeat, number = (5, 5) if args.quick else (9, 10)

    bandwidth = read_bandwidth_gbs(1 << 30 if not args.quick else 1 << 28, repeat=10)
    section: dict = {"shape": [n, k], "threads": THREADS, "read_bandwidth_gbs": bandwidth, "batches": {}}
    with tempfile.TemporaryDirectory(prefix="gemv-") as tmp:
        for batch in (1, 64):
            rows = bench_batch(batch, n, k, repeat, number if batch == 1 else max(1, number // 5), Path(tmp))
            section["batches"][str(batch)] = rows
    lut = section["batches"]["1"]["lastbit_lut_pow2-4"]
    section["goals"] = {} if "ms" not in lut else {
        "batch1_lut_vs_torch_fp32 (goal >= 8)": lut["speedup_vs_torch_fp32"],
        "batch1_lut_vs_ort_int8 (goal >= 2.5)": lut["speedup_vs_ort_int8"],
        "batch1_lut_packed_bandwidth_fraction (goal >= 0.8)": lut["packed_gbs"] / bandwidth,
    }
    update_section("gemv_lowbit", section)
    print(f"read bandwidth {bandwidth:.1f} GB/s")
    for batch, rows in section["batches"].items():
        print(f"batch {batch}:")
        for name, row in rows.items():
            if "ms" not in row:
                print(f"  {name:28s} skipped: {row['skipped']}")
                continue
            extra = f"  {row['packed_gbs']:.1f} GB/s packed, exact={row['bit_exact']}" if "packed_gbs" in row else ""
            print(f"  {name:28s} {row['ms']:8.3f} ms  ×{row['speedup_vs_torch_fp32']:5.2f} vs torch"
                  f"  ×{row['speedup_vs_ort_int8']:5.2f} vs ort int8{extra}")
    return section


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

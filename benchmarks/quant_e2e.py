"""Quantized end to end, batch 1: lastbit 3-bit (integer kernels) vs lastbit fp32 vs torch fp32
vs onnxruntime fp32 and int8, measured in one process run.  Writes bench/results.json.

The int8 peers are onnxruntime's dynamic quantization of the same model (MatMul and Conv
weights int8, activations quantized per call) and, for convolutional models, static QDQ
quantization calibrated on the same random samples lastbit calibrates on.  The issue's
goals: lastbit 3-bit ≤ 0.5× torch fp32 latency and ≤ onnxruntime int8.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from results import median_ms

MODELS = ("resnet18", "mlp", "ffn")
QUICK_MODELS = ("resnet20", "mlp")
CALIBRATION_SAMPLES = 8


def _onnx_bytes(module, example) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"])
    return buf.getvalue()


def _session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _ort_int8_dynamic(fp32: bytes, workdir: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = workdir / "fp32.onnx", workdir / "int8_dynamic.onnx"
    src.write_bytes(fp32)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return _session(dst.read_bytes())


def _ort_int8_static(fp32: bytes, workdir: Path, calib: np.ndarray):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    src, dst = workdir / "fp32_static.onnx", workdir / "int8_static.onnx"
    src.write_bytes(fp32)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return _session(dst.read_bytes())


def bench_model(name: str, repeat: int) -> dict:
    import torch

    import lastbit
    from lastbit import Squeeze
    from lastbit.frontend.models import get_model

    module, example = get_model(name, pretrained=False)  # latency does not depend on the weights
    x = example.numpy()
    calib = np.random.default_rng(0).standard_normal((CALIBRATION_SAMPLES, *x.shape[1:])).astype(x.dtype)
    start = time.perf_counter()
    quantized = lastbit.compile(module, "x86_64-linux-gnu", (example,), name=name,
                                squeeze=Squeeze(bits=3, data=calib))
    q_out = quantized.run(x)
    compile_q_s = time.perf_counter() - start
    fp32 = lastbit.compile(module, "x86_64-linux-gnu", (example,), name=name)
    with torch.no_grad():
        ref = module(example).numpy()
    row = {
        "model": name,
        "compile_3bit_s": round(compile_q_s, 2),
        "kernels_3bit": sorted({layer.kernel for layer in quantized.report().layers}),
        "max_rel_err_3bit_vs_torch": float(np.abs(q_out - ref).max() / max(np.abs(ref).max(), 1e-6)),
    }
    onnx_fp32 = _onnx_bytes(module, example)
    sessions = {"onnxruntime_fp32_ms": _session(onnx_fp32)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sessions["onnxruntime_int8_dynamic_ms"] = _ort_int8_dynamic(onnx_fp32, Path(tmp))
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            row["onnxruntime_int8_dynamic_error"] = str(err).splitlines()[0]
        if x.ndim == 4:
            try:
                sessions["onnxruntime_int8_static_ms"] = _ort_int8_static(onnx_fp32, Path(tmp), calib)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
                row["onnxruntime_int8_static_error"] = str(err).splitlines()[0]
    # every peer timed back to back in this one run
    row["lastbit_3bit_ms"] = quantized.latency_ms(x, repeat=repeat)
    row["lastbit_fp32_ms"] = fp32.latency_ms(x, repeat=repeat)
    with torch.no_grad():
        row["torch_fp32_ms"] = median_ms(lambda: module(example), repeat)
    for key, session in sessions.items():
        try:
            row[key] = median_ms(lambda s=session: s.run(None, {"x": x}), repeat)
        except Exception as err:  # noqa: BLE001 - e.g. ConvInteger not implemented for a shape
            row[key.replace("_ms", "_error")] = str(err).splitlines()[0]
    q = row["lastbit_3bit_ms"]
    row["ratio_3bit_vs_torch_fp32"] = q / row["torch_fp32_ms"]  # goal ≤ 0.5
    row["ratio_3bit_vs_lastbit_fp32"] = q / row["lastbit_fp32_ms"]
    int8 = [row[k] for k in ("onnxruntime_int8_dynamic_ms", "onnxruntime_int8_static_ms") if k in row]
    if int8:
        row["ratio_3bit_vs_best_onnxruntime_int8"] = q / min(int8)  # goal ≤ 1
    return row


# Layer shapes of the benchmarked models (ResNet-18 stages, the MLP), for the per-kernel table
KERNEL_LAYERS = {
    "resnet18.layer1.conv": {"op": "conv2d", "data_shape": (1, 64, 56, 56), "weight_shape": (64, 64, 3, 3),
                             "padding": (1, 1, 1, 1)},
    "resnet18.layer3.conv_s2": {"op": "conv2d", "data_shape": (1, 128, 28, 28), "weight_shape": (256, 128, 3, 3),
                                "strides": (2, 2), "padding": (1, 1, 1, 1)},
    "mlp.layers.0": {"op": "dense", "data_shape": (1, 784), "weight_shape": (512, 784)},
    "dense4096": {"op": "dense", "data_shape": (1, 4096), "weight_shape": (4096, 4096)},
}


def bench_kernels(repeat: int, quick: bool) -> list[dict]:
    """Every registered integer kernel that serves a layer, timed alone on one thread (3-bit
    pow2 codes): the data behind the order of the x86 target's kernel strategy."""
    import tvm
    from tvm import s_tir

    from lastbit.codegen.kernels import IntLayer, list_kernels
    from lastbit.targets import get_target

    target = get_target("x86_64-linux-gnu")
    features = target.feature_set()
    rng = np.random.default_rng(0)
    rows = []
    layers = dict(list(KERNEL_LAYERS.items())[1:3]) if quick else KERNEL_LAYERS
    # One thread, as the section name says (TVM's pool otherwise uses every core); the
    # end-to-end rows before this ran on 2 threads.
    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    for label, spec in layers.items():
        layer = IntLayer(code_set="pow2-4", bits=3, **spec)
        codes = rng.choice(np.array([-4, -2, -1, 0, 1, 2, 4], np.int8), layer.weight_shape)
        x_q = rng.integers(-127, 128, layer.data_shape).astype(np.int8)
        for kernel in list_kernels():
            if kernel.supports(layer, features) is not None:
                continue
            sch = s_tir.Schedule(kernel.prim_func(layer))
            kernel.schedule(sch, layer, features)
            lib = tvm.tirx.build(sch.mod, target=target.tvm())
            out_param = sch.mod["main"].params[-1]  # PrimFunc params are buffers in TVM 0.27
            out = np.zeros([int(d) for d in out_param.shape], "int32")
            args = [tvm.runtime.tensor(a) for a in (x_q, *kernel.pack(layer, codes), out)]
            timer = lib.time_evaluator("main", tvm.cpu(), number=max(1, repeat // 3), repeat=3)
            rows.append({"layer": label, "kernel": kernel.name, "ms": timer(*args).median * 1e3})
            print(f"  {label:<26} {kernel.name:<14} {rows[-1]['ms']:9.3f} ms")
    tvm.get_global_func("runtime.config_threadpool")(1, os.cpu_count() or 1)  # later benchmarks: all cores
    return rows


def main(argv=None) -> list[dict]:
    from results import model_bench_args, update_section

    args = model_bench_args(argv, __doc__)
    names = args.models or (QUICK_MODELS if args.quick else MODELS)
    repeat = args.repeat or (10 if args.quick else 30)
    rows = []
    for name in names:
        row = bench_model(name, repeat)
        rows.append(row)
        print(
            f"{name:<10} lastbit 3-bit {row['lastbit_3bit_ms']:8.3f} ms  fp32 {row['lastbit_fp32_ms']:8.3f}  "
            f"torch {row['torch_fp32_ms']:8.3f}  ort fp32 {row.get('onnxruntime_fp32_ms', float('nan')):8.3f}  "
            f"ort int8 dyn {row.get('onnxruntime_int8_dynamic_ms', float('nan')):8.3f}  "
            f"static {row.get('onnxruntime_int8_static_ms', float('nan')):8.3f}  "
            f"3-bit/torch {row['ratio_3bit_vs_torch_fp32']:.2f}  kernels {','.join(row['kernels_3bit'])}"
        )
    kernels = bench_kernels(repeat, args.quick)
    update_section("quant_e2e", {"quick": args.quick, "batch": 1, "bits": 3, "rows": rows, "kernels_1thread": kernels})
    return rows


if __name__ == "__main__":
    main()

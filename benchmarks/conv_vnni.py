"""int8 VNNI direct conv2d (int8-vnni-conv) vs reference-int vs lastbit fp32 vs torch fp32 on the ResNet-18 conv layers, 1 and 2 threads (and the int8 kernel against the vpdpbusd peak), plus ResNet-18 end to end. Writes bench/results.json.

Per layer, in one process run and back to back: the integer kernels alone (int8 NCHW in, int32
NCHW accumulators out, input packing included: what the lowering calls), lastbit's fp32 build
of the same ``Conv2d`` (layout transforms at its edges included, through the VM) and torch's
``conv2d``.  ``resnet18_conv_ms`` weights each layer by how often ResNet-18 runs it.  End to
end (2 threads): ResNet-18 at 3 bits with the x86 strategy, at 3 bits with conv2d forced to
``reference-int`` (the strategy before this kernel), lastbit fp32 and torch fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
from results import median_ms

# ResNet-18 (ImageNet, batch 1) conv layers: (C, H, O, kernel, stride, padding), times run per image
LAYERS = {
    "conv1_7x7_s2": ((3, 224, 64, 7, 2, 3), 1),
    "layer1_3x3": ((64, 56, 64, 3, 1, 1), 4),
    "layer2_3x3_s2": ((64, 56, 128, 3, 2, 1), 1),
    "layer2_1x1_s2": ((64, 56, 128, 1, 2, 0), 1),
    "layer2_3x3": ((128, 28, 128, 3, 1, 1), 3),
    "layer3_3x3_s2": ((128, 28, 256, 3, 2, 1), 1),
    "layer3_1x1_s2": ((128, 28, 256, 1, 2, 0), 1),
    "layer3_3x3": ((256, 14, 256, 3, 1, 1), 3),
    "layer4_3x3_s2": ((256, 14, 512, 3, 2, 1), 1),
    "layer4_1x1_s2": ((256, 14, 512, 1, 2, 0), 1),
    "layer4_3x3": ((512, 7, 512, 3, 1, 1), 3),
}
QUICK_LAYERS = ("layer1_3x3", "layer3_3x3_s2", "layer4_3x3")
THREADS = (1, 2)
KERNELS = ("int8-vnni-conv", "reference-int")
CALIBRATION_SAMPLES = 8


def set_threads(n: int) -> None:
    """TVM's worker pool and torch's intra-op pool both to ``n`` threads."""
    import torch
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)
    torch.set_num_threads(n)


def _macs(spec) -> int:
    """Useful MACs of one call of the layer ``spec`` (``LAYERS``' tuple)."""
    from lastbit.codegen.kernels import IntLayer
    from lastbit.codegen.kernels.common import layer_macs

    c, h, o, k, s, p = spec
    return layer_macs(IntLayer("conv2d", "pow2-4", 3, (1, c, h, h), (o, c, k, k), strides=(s, s), padding=(p,) * 4))


def bench_layer(spec, repeat: int, rng) -> dict[int, dict]:
    """{threads: {engine: ms}} for one conv layer; the integer kernels are checked against
    quant_reference first (a wrong kernel is not timed)."""
    import torch

    import lastbit
    from lastbit.codegen.kernels import IntLayer, get_kernel
    from lastbit.codegen.kernels.common import build_for_host
    from lastbit.codegen.quant_reference import int_conv2d

    c, h, o, k, s, p = spec
    layer = IntLayer("conv2d", "pow2-4", 3, (1, c, h, h), (o, c, k, k), strides=(s, s), padding=(p,) * 4)
    codes = rng.choice(np.array([-4, -2, -1, 0, 1, 2, 4], np.int8), layer.weight_shape)
    x_q = rng.integers(-127, 128, layer.data_shape).astype(np.int8)
    ref = int_conv2d(x_q, codes, s, p)
    built = {}
    for name in KERNELS:
        kernel = build_for_host(get_kernel(name), layer, codes)
        if not np.array_equal(kernel(x_q), ref):
            raise AssertionError(f"{name} is not bit-exact on {layer}")
        built[name] = kernel
    conv = torch.nn.Conv2d(c, o, k, stride=s, padding=p, bias=False).eval()
    x = torch.from_numpy(rng.standard_normal(layer.data_shape).astype(np.float32))
    fp32 = lastbit.compile(conv, "x86_64-linux-gnu", (x,), name="conv")
    rows = {}
    for threads in THREADS:
        set_threads(threads)
        row = {f"{name}_ms": kernel.time_ms(x_q, number=max(1, repeat // 3), repeat=5) for name, kernel in built.items()}
        row["lastbit_fp32_ms"] = fp32.latency_ms(x.numpy(), repeat=repeat)
        with torch.no_grad():
            row["torch_fp32_ms"] = median_ms(lambda: conv(x), repeat)
        rows[threads] = row
    return rows


def bench_resnet(name: str, repeat: int) -> dict:
    """End to end at 2 threads: 3-bit with the x86 strategy, 3-bit with conv2d on reference-int,
    lastbit fp32, torch fp32 (same random weights; latency does not depend on them)."""
    import torch

    import lastbit
    from lastbit import Squeeze
    from lastbit.frontend.models import get_model
    from lastbit.targets import get_target

    module, example = get_model(name, pretrained=False)
    x = example.numpy()
    calib = np.random.default_rng(0).standard_normal((CALIBRATION_SAMPLES, *x.shape[1:])).astype(x.dtype)
    host = get_target("x86_64-linux-gnu")
    before = dataclasses.replace(host, kernels={**host.kernels, "conv2d": ("reference-int",)})
    squeeze = Squeeze(bits=3, data=calib)
    q_now = lastbit.compile(module, host, (example,), name=name, squeeze=squeeze)
    q_before = lastbit.compile(module, before, (example,), name=name, squeeze=squeeze)
    fp32 = lastbit.compile(module, host, (example,), name=name)
    set_threads(2)
    identical = bool(np.array_equal(q_now.run(x), q_before.run(x)))  # both bit-exact to the contract
    row = {
        "model": name,
        "threads": 2,
        "kernels_3bit": sorted({layer.kernel for layer in q_now.report().layers}),
        "outputs_identical_to_reference_int": identical,
        "lastbit_3bit_ms": q_now.latency_ms(x, repeat=repeat),
        "lastbit_3bit_reference_int_conv_ms": q_before.latency_ms(x, repeat=repeat),
        "lastbit_fp32_ms": fp32.latency_ms(x, repeat=repeat),
    }
    with torch.no_grad():
        row["torch_fp32_ms"] = median_ms(lambda: module(example), repeat)
    row["ratio_3bit_vs_lastbit_fp32"] = row["lastbit_3bit_ms"] / row["lastbit_fp32_ms"]
    row["ratio_3bit_vs_torch_fp32"] = row["lastbit_3bit_ms"] / row["torch_fp32_ms"]
    row["speedup_vs_reference_int_conv"] = row["lastbit_3bit_reference_int_conv_ms"] / row["lastbit_3bit_ms"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    from results import update_section

    from lastbit.targets import get_target

    logging.basicConfig(level=logging.WARNING)
    features = get_target("x86_64-linux-gnu").feature_set()
    if not {"avx512bw", "avx512vnni"} <= features:
        print("  conv_vnni: host lacks AVX-512 VNNI; nothing to measure")
        update_section("conv_vnni", {"skipped": "host lacks AVX-512 VNNI"})
        return {}
    repeat = args.repeat or (10 if args.quick else 30)
    rng = np.random.default_rng(0)
    from lastbit.autotune.roofline import RooflineError, host_vnni_peak_gmacs

    try:  # what no vpdpbusd kernel passes, per thread count (autotune/roofline.py)
        peak = {threads: host_vnni_peak_gmacs(threads) for threads in THREADS}
        print("  vpdpbusd peak: " + "  ".join(f"{t}T {g:.0f} GMAC/s" for t, g in peak.items()))
    except RooflineError as err:
        peak = {}
        print(f"  no vpdpbusd peak: {err}")
    names = QUICK_LAYERS if args.quick else tuple(LAYERS)
    layers = []
    for name in names:
        spec, count = LAYERS[name]
        for threads, row in bench_layer(spec, repeat, rng).items():
            row = {"layer": name, "threads": threads, "runs_per_image": count, **row}
            row["vnni_vs_lastbit_fp32"] = row["int8-vnni-conv_ms"] / row["lastbit_fp32_ms"]
            row["vnni_vs_torch_fp32"] = row["int8-vnni-conv_ms"] / row["torch_fp32_ms"]
            row["vnni_vs_reference_int"] = row["int8-vnni-conv_ms"] / row["reference-int_ms"]
            if threads in peak:
                row["vnni_fraction_of_peak"] = _macs(spec) / row["int8-vnni-conv_ms"] / 1e6 / peak[threads]
            layers.append(row)
            of_peak = f"  vnni {row['vnni_fraction_of_peak']:.0%} of peak" if threads in peak else ""
            print(f"  {name:<15} {threads}T  vnni {row['int8-vnni-conv_ms']:7.3f} ms  ref-int {row['reference-int_ms']:7.3f}"
                  f"  lastbit fp32 {row['lastbit_fp32_ms']:7.3f}  torch fp32 {row['torch_fp32_ms']:7.3f}"
                  f"  vnni/fp32 {row['vnni_vs_lastbit_fp32']:.2f}{of_peak}")
    totals = {}
    if not args.quick:  # the whole network's convolutions, each layer weighted by its runs
        for threads in THREADS:
            rows = [r for r in layers if r["threads"] == threads]
            totals[threads] = {key: sum(r[key] * r["runs_per_image"] for r in rows)
                               for key in ("int8-vnni-conv_ms", "reference-int_ms", "lastbit_fp32_ms", "torch_fp32_ms")}
            print(f"  resnet18 convs {threads}T: " + "  ".join(f"{k} {v:.2f}" for k, v in totals[threads].items()))
    model = "resnet20" if args.quick else "resnet18"
    e2e = bench_resnet(model, repeat)
    print(f"  {model} 2T: 3-bit {e2e['lastbit_3bit_ms']:.2f} ms (reference-int convs {e2e['lastbit_3bit_reference_int_conv_ms']:.2f})"
          f"  lastbit fp32 {e2e['lastbit_fp32_ms']:.2f}  torch fp32 {e2e['torch_fp32_ms']:.2f}"
          f"  3-bit/fp32 {e2e['ratio_3bit_vs_lastbit_fp32']:.2f}")
    section = {"quick": args.quick, "batch": 1, "vnni_peak_gmacs": peak, "layers": layers, "resnet18_conv_ms": totals,
               "end_to_end": e2e}
    update_section("conv_vnni", section)
    return section


if __name__ == "__main__":
    main()

"""ARM without a board: dynamic instructions under qemu-user and estimated Cortex-A53 / A76
cycles (a per-class throughput model, ``targets/arm_cycle_model.py``) for quantized layers
(3-bit codes, integer kernels) vs the fp32 build of the same layers, per inference, on
aarch64+i8mm, aarch64+dotprod, plain aarch64 and armv7. Writes the ``arm_insn_count`` section
of bench/results.json; a run limited with ``--targets``/``--layers`` replaces only its own rows.
``--update-cost-table`` fits each kernel's cost-table entry (codegen/kernel_cost.py) to its
whole-layer counts on the single layers of each op (forced onto it where the target picks
another) and writes it into codegen/kernel_costs.json for the targets run. These are qemu
counts and a cycle model, not board timings.

Counting (``codegen/qemu_count.py``): qemu's ``-d in_asm,exec,nochain`` logs, each executed
block's instructions counted once per execution; the bundle runs with ``--repeat 1`` and
``--repeat 3`` and the count per inference is half the difference, so start-up cancels out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

TARGETS = ("aarch64-i8mm-linux-gnu", "aarch64-dotprod-linux-gnu", "aarch64-linux-gnu", "armv7a-linux-gnueabihf")
LAYERS = ("conv3x3", "conv3x3-r18", "dense", "resnet20")
QUICK_LAYERS = ("conv3x3", "dense")
CORES = ("cortex-a53", "cortex-a76")
# Kernels each small layer is also forced onto (the first that serves the layer on the target
# wins; reference-int serves everything, so it ends every list): the data behind the strategies.
# An alternative none of whose kernels serves the layer on the target, or that would pick the
# kernel the target picked anyway, is skipped.
ALTERNATIVES = {
    "reference-int": ("reference-int",),
    "lut-neon": ("lut-neon", "lut-neon-v7"),
    "int8-sdot": ("int8-sdot",),
    "int8-smmla": ("int8-smmla",),
    "lut-sdot": ("lut-sdot",),
}
ALTERNATIVE_LAYERS = ("conv3x3", "conv3x3-r18", "dense")
SINGLE_LAYERS = ("conv3x3", "conv3x3-r18", "dense")


def layer_model(name: str):
    """One layer as its own torch module — ResNet-20's 3×3 conv + BN + ReLU (32 channels,
    14×14), a ResNet-18 stage-4 3×3 conv + BN + ReLU (512 channels, 7×7), the MLP's 512 → 256
    dense + ReLU — or a whole zoo model (random weights) by name."""
    import torch

    torch.manual_seed(0)
    convs = {"conv3x3": (32, 14), "conv3x3-r18": (512, 7)}
    if name in convs:
        channels, size = convs[name]
        module = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                     torch.nn.BatchNorm2d(channels), torch.nn.ReLU())
        x = torch.randn(1, channels, size, size)
    elif name == "dense":
        module = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU())
        x = torch.randn(1, 512)
    else:
        from lastbit.frontend.models import get_model

        module, x = get_model(name, pretrained=False)
    return module.eval(), x


def _measure(artifact, bundle_dir: Path, x: np.ndarray) -> dict:
    from lastbit.codegen.qemu_count import count_bundle

    counts = count_bundle(artifact.export(bundle_dir), [x])
    return {"insns": counts.total, **{f"cycles_{core[7:]}": round(counts.cycles(core)) for core in CORES},
            "classes": dict(sorted(counts.by_class.items()))}


def _int_layer(module, x: np.ndarray, squeeze):
    """The single-layer model's quantized layer as the kernels see it."""
    import torch

    from lastbit.codegen.kernels import IntLayer

    layer_torch = next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    weight_shape = tuple(layer_torch.weight.shape)
    if isinstance(layer_torch, torch.nn.Conv2d):
        pad = layer_torch.padding[0]
        return IntLayer("conv2d", squeeze.code_set.name, squeeze.code_set.bits, x.shape, weight_shape,
                        padding=(pad, pad, pad, pad))
    return IntLayer("dense", squeeze.code_set.name, squeeze.code_set.bits, x.shape, weight_shape)


def _kernel_alone(layer, squeeze, artifact, target, workdir: Path) -> int:
    """Instructions of the layer's integer kernel alone (no input quantize, no epilogue), on
    random codes of the squeeze's code set: how much of the layer the kernel is."""
    from lastbit.codegen.kernels import get_kernel
    from lastbit.codegen.qemu_count import count_kernels

    kernel = get_kernel(artifact.report().layers[0].kernel)
    rng = np.random.default_rng(0)
    codes = rng.choice(squeeze.code_set.levels, size=layer.weight_shape).astype(np.int8)
    x_q = rng.integers(-127, 128, size=layer.data_shape, dtype=np.int8)
    return count_kernels([(kernel, layer, codes, x_q)], target, workdir).total


def _alternative_kernel(kernels: tuple[str, ...], layer, target) -> str | None:
    """The kernel a forced strategy of ``kernels`` gives ``layer`` on ``target`` (None: none serves)."""
    from lastbit.codegen.kernels import get_kernel

    features = target.feature_set()
    return next((k for k in kernels if get_kernel(k).supports(layer, features) is None), None)


def bench(name: str, triple: str, workdir: Path, alternatives: bool = True) -> dict:
    """fp32 vs 3-bit with the target's own kernel choice (and, for the small layers, 3-bit
    forced through a copy of the target onto each kernel of ALTERNATIVES)."""
    import lastbit
    from lastbit import Squeeze
    from lastbit.targets import get_target

    module, example = layer_model(name)
    x = example.numpy()
    calib = np.random.default_rng(0).standard_normal((8, *x.shape[1:])).astype(x.dtype)
    squeeze = Squeeze(bits=3, keep_first_last=False, data=calib)
    target = get_target(triple)
    fp32 = lastbit.compile(module, target, (example,), name=f"{name}-fp32")
    quantized = lastbit.compile(module, target, (example,), name=f"{name}-3bit", squeeze=squeeze)
    f = _measure(fp32, workdir / f"{name}-{triple}-fp32", x)
    q = _measure(quantized, workdir / f"{name}-{triple}-3bit", x)
    row = {
        "layer": name,
        "target": triple,
        "kernels_3bit": sorted({layer.kernel for layer in quantized.report().layers}),
        "mflops": quantized.report().flops / 1e6,
        "insns_fp32": f["insns"],
        "insns_3bit": q["insns"],
        "ratio_3bit_vs_fp32": q["insns"] / f["insns"] if f["insns"] else None,
        "classes_fp32": f["classes"],
        "classes_3bit": q["classes"],
    }
    for core in CORES:
        key = f"cycles_{core[7:]}"
        row[f"{key}_fp32"], row[f"{key}_3bit"] = f[key], q[key]
        row[f"{key}_ratio"] = q[key] / f[key] if f[key] else None
    if name not in SINGLE_LAYERS:
        return row
    from lastbit.codegen.kernel_cost import io_elements, work_units

    layer = _int_layer(module, x, squeeze)
    kernel_only = _kernel_alone(layer, squeeze, quantized, target, workdir / f"{name}-{triple}-kernel")
    row["insns_3bit_kernel_only"] = kernel_only
    row["ratio_3bit_kernel_only_vs_fp32"] = kernel_only / f["insns"] if f["insns"] else None
    # whole-layer instructions of each kernel seen alone, with the layer's work units and
    # input + output elements: what the cost table's entries are fitted to
    counted = row["cost_counts"] = {}

    def count(kernel: str, insns: int) -> None:
        counted[kernel] = {"insns": insns, "work_units": work_units(kernel, layer),
                           "io_elements": io_elements(layer)}

    if len(row["kernels_3bit"]) == 1:
        count(row["kernels_3bit"][0], q["insns"])
    if alternatives and name in ALTERNATIVE_LAYERS:
        for label, kernels in ALTERNATIVES.items():
            kernel = _alternative_kernel(kernels, layer, target)
            if kernel is None or [kernel] == row["kernels_3bit"]:
                continue
            forced = dataclasses.replace(target, kernels={"dense": kernels, "conv2d": kernels})
            artifact = lastbit.compile(module, forced, (example,), name=f"{name}-3bit-{label}", squeeze=squeeze)
            alt = _measure(artifact, workdir / f"{name}-{triple}-{label}", x)
            key = label.replace("-", "_")
            row[f"insns_3bit_{key}"] = alt["insns"]
            row[f"ratio_3bit_{key}_vs_fp32"] = alt["insns"] / f["insns"] if f["insns"] else None
            row[f"kernels_3bit_{key}"] = sorted({layer.kernel for layer in artifact.report().layers})
            if row[f"kernels_3bit_{key}"] == [kernel]:
                count(kernel, alt["insns"])
    return row


def update_cost_table(rows: list[dict]) -> None:
    """Entries of codegen/kernel_costs.json fitted (``kernel_cost.fit_rate``) to every kernel's
    counts on the single layers of each op, for the targets in ``rows``; other entries stay."""
    import json
    from collections import defaultdict

    from lastbit.codegen.kernel_cost import COST_TABLE, fit_rate
    from lastbit.fileio import atomic_write_text

    counts = defaultdict(list)  # (target, kernel, op) -> [(insns, work units, io elements)]
    for row in rows:
        op = "dense" if row["layer"] == "dense" else "conv2d"
        for kernel, c in row.get("cost_counts", {}).items():
            counts[row["target"], kernel, op].append((c["insns"], c["work_units"], c["io_elements"]))
    table = json.loads(COST_TABLE.read_text())
    for (target, kernel, op), measured in counts.items():
        table.setdefault(target, {}).setdefault(kernel, {})[op] = fit_rate(measured)
    atomic_write_text(COST_TABLE, json.dumps(table, indent=2) + "\n")


def _merged(rows: list[dict], previous: dict | None) -> list[dict]:
    """This run's rows in place of the previous section's rows of the same (layer, target)."""
    ran = {(r["layer"], r["target"]) for r in rows}
    kept = [r for r in (previous or {}).get("rows", []) if (r["layer"], r["target"]) not in ran]
    order = {t: i for i, t in enumerate(TARGETS)}
    return sorted(kept + rows, key=lambda r: order.get(r["target"], len(order)))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="aarch64+dotprod only, the two small layers")
    parser.add_argument("--layers", nargs="*", help=f"layers or zoo models (default {' '.join(LAYERS)})")
    parser.add_argument("--targets", nargs="*", help=f"default {' '.join(TARGETS)}")
    parser.add_argument("--no-alternatives", action="store_true", help="skip the forced-kernel columns")
    parser.add_argument("--update-cost-table", action="store_true",
                        help="write the measured rates into codegen/kernel_costs.json")
    args = parser.parse_args(argv)
    from results import update_section

    from lastbit.targets import get_target

    logging.basicConfig(level=logging.WARNING)
    triples = args.targets or (TARGETS[:1] if args.quick else TARGETS)
    names = args.layers or (QUICK_LAYERS if args.quick else LAYERS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lastbit-insn-bundles-") as tmp:
        for triple in triples:
            missing = get_target(triple).missing_tools()
            if missing:
                print(f"skipping {triple}: needs {', '.join(missing)}")
                continue
            for name in names:
                row = bench(name, triple, Path(tmp), alternatives=not args.no_alternatives)
                rows.append(row)
                forced = "".join(
                    f"  {label} {row['ratio_3bit_' + label.replace('-', '_') + '_vs_fp32']:.2f}x"
                    for label in ALTERNATIVES if "insns_3bit_" + label.replace("-", "_") in row
                )
                alone = (f" (kernel alone {row['ratio_3bit_kernel_only_vs_fp32']:.2f}x)"
                         if "insns_3bit_kernel_only" in row else "")
                print(f"{name:<12} {triple:<26} fp32 {row['insns_fp32']:>11,} insns  3-bit {row['insns_3bit']:>11,}"
                      f" ({','.join(row['kernels_3bit'])}) {row['ratio_3bit_vs_fp32']:.2f}x insns{alone},"
                      f" {row['cycles_a53_ratio']:.2f}x A53 / {row['cycles_a76_ratio']:.2f}x A76 cycles{forced}",
                      flush=True)
    if args.update_cost_table:
        update_cost_table(rows)
    if (args.targets or args.layers) and not args.quick:  # a partial run: keep the other rows
        import json

        from results import RESULTS

        previous = json.loads(RESULTS.read_text()).get("arm_insn_count") if RESULTS.is_file() else None
        rows = _merged(rows, previous)
    update_section("arm_insn_count", {
        "quick": args.quick,
        "method": "qemu-user -d in_asm,exec,nochain instruction counts; cycles from targets/arm_cycle_model.py "
                  "(per-class throughput model, not board timings)",
        "rows": rows,
    })
    return rows


if __name__ == "__main__":
    main()

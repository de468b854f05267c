"""Simulated shift-add accelerator: ResNet-20/ResNet-18 (3-bit pow2) cycles, PE utilisation, DRAM and energy vs an int8-MAC array.

Each model is quantized data-free (random-init zoo weights: hardware numbers do not depend on
accuracy), compiled for ``accel-sim`` (default preset) and for the x86 integer path; the two
outputs must agree bit for bit. Utilisation is grouped by layer type (3×3 conv, other conv,
dense); energy is the Horowitz-table estimate of codegen/accel/energy.py, beside the
int8-MAC twin of the same array. Wall time of one inference (host part + simulator, after
a warm-up that builds the host VM) and the part spent in the simulator drivers. Writes the
"accel_sim" section of bench/results.json.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
from results import update_section

MODELS = ("resnet20", "resnet18")
QUICK_MODELS = ("resnet20",)


def layer_type(row: dict) -> str:
    if row["kind"] == "dense":
        return "dense"
    return "conv3x3" if row["kernel"] == [3, 3] else f"conv{row['kernel'][0]}x{row['kernel'][1]}"


def measure(name: str, target: str = "accel-sim") -> dict:
    import lastbit
    from lastbit.frontend.models import get_model

    model, x = get_model(name, pretrained=False, progress=False)
    squeeze = lastbit.Squeeze(bits=3)
    start = time.perf_counter()
    accel = lastbit.compile(model, target, (x,), squeeze=squeeze)
    compile_s = time.perf_counter() - start
    host = lastbit.compile(model, "x86_64-linux-gnu", (x,), squeeze=squeeze)
    expected = host.run(x)
    module = accel._compiled.accel
    accel.run(x)  # builds the host VM once
    module.sim_seconds = 0.0
    start = time.perf_counter()
    got = accel.run(x)
    run_s = time.perf_counter() - start
    driver_s = module.sim_seconds  # inside the accelerator drivers: quantize, simulate, scale
    summary = module.summary()
    groups: dict[str, dict] = {}
    for row in summary["layers"]:
        g = groups.setdefault(layer_type(row), {"macs": 0, "cycles": 0, "layers": 0})
        g["macs"] += row["macs"]
        g["cycles"] += row["cycles"]
        g["layers"] += 1
    pes = summary["config"]["rows"] * summary["config"]["cols"]
    utilisation = {k: v["macs"] / (v["cycles"] * pes) for k, v in groups.items()}
    total = summary["total"]
    return {
        "target": target,
        "offloaded_layers": summary["offloaded_layers"],
        "host_layers": sorted(summary["host_layers"]),
        "bit_exact_vs_x86_integer": bool(np.array_equal(got, expected)),
        "cycles": total["cycles"],
        "latency_ms_at_clock": total["latency_ms"],
        "pe_utilisation": total["pe_utilisation"],
        "pe_utilisation_by_layer_type": utilisation,
        "dram_bytes": total["dram_bytes"],
        "energy_uj": total["energy_pj"] / 1e6,
        "energy_split_uj": {k: v / 1e6 for k, v in total["energy_split_pj"].items()},
        "mac8_cycles": summary["mac8_cycles"],
        "mac8_dram_bytes": summary["mac8_dram_bytes"],
        "mac8_energy_uj": summary["mac8_total_energy_pj"] / 1e6,
        "energy_ratio_vs_mac8": summary["energy_ratio_vs_mac8"],
        "pe_area_mm2": total["pe_area_mm2"],
        "mac8_pe_area_mm2": summary["mac8_pe_area_mm2"],
        "compile_s": compile_s,
        "inference_s": run_s,
        "simulate_s": driver_s,
    }


def main(argv: list[str] | None = None) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lastbit").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only")
    args = parser.parse_args(argv)
    results = {}
    for name in QUICK_MODELS if args.quick else MODELS:
        r = measure(name)
        results[name] = r
        util = ", ".join(f"{k} {v:.1%}" for k, v in sorted(r["pe_utilisation_by_layer_type"].items()))
        print(f"{name}: bit-exact vs x86 integer: {r['bit_exact_vs_x86_integer']}; {r['cycles']:,} cycles "
              f"({r['latency_ms_at_clock']:.2f} ms at clock); utilisation {util}; DRAM {r['dram_bytes'] / 1e6:.2f} MB "
              f"(int8-MAC {r['mac8_dram_bytes'] / 1e6:.2f} MB); energy {r['energy_uj']:.1f} uJ vs int8-MAC "
              f"{r['mac8_energy_uj']:.1f} uJ ({r['energy_ratio_vs_mac8']:.0%}); one inference {r['inference_s']:.2f} s "
              f"wall, {r['simulate_s']:.2f} s of it in the simulator")
    update_section("accel_sim", {"preset": "default", "models": results, "quick": args.quick})
    return results


if __name__ == "__main__":
    main()

"""ARM dynamic instruction counts under qemu-user: quantized layers (3-bit codes, integer
kernels) vs the fp32 build of the same layers, per inference, on aarch64 and armv7.
The ARM proxy for speed until a board is at hand.  Writes bench/results.json.

Debian's qemu 7.2 ships no TCG plugins (and no ``qemu-plugin.h`` to build the ``insn``
one), so the count comes from qemu's own logs: ``-d in_asm`` prints every translated
block with its instructions, ``-d exec,nochain`` prints the guest PC of every block
executed (chaining off, so none is skipped); instructions = Σ over executed blocks of the
block's length.  Loader and runner start-up cancel out: the bundle runs with
``--repeat 1`` (2 inferences) and ``--repeat 3`` (4 inferences), and the count per
inference is half the difference.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

TARGETS = ("aarch64-linux-gnu", "armv7a-linux-gnueabihf")
LAYERS = ("conv3x3", "dense")
_TB_START = re.compile(r"^(0x[0-9a-f]+):")
_TRACE = re.compile(r"^Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/")


def count_instructions(log_path: Path) -> int:
    """Guest instructions executed, from a qemu ``-d in_asm,exec,nochain`` log."""
    lengths: dict[int, int] = {}  # block start PC -> instructions (the latest translation)
    total = 0
    block_pc, block_len = None, 0
    with open(log_path, errors="replace") as log:
        for line in log:
            if line.startswith("Trace"):
                match = _TRACE.match(line)
                if match:
                    total += lengths.get(int(match.group(1), 16), 0)
                continue
            if line.startswith("IN:"):
                block_pc, block_len = None, 0
                continue
            match = _TB_START.match(line)
            if match:
                if block_pc is None:
                    block_pc = int(match.group(1), 16)
                block_len += 1
                lengths[block_pc] = block_len
            elif not line.strip():
                block_pc, block_len = None, 0
    return total


def instructions_per_inference(bundle: Path, x: np.ndarray) -> int:
    """(count at --repeat 3) − (count at --repeat 1), halved: start-up cancels out."""
    from lastbit.codegen.bundle import _runner_prefix, load_manifest

    prefix = _runner_prefix(load_manifest(bundle))
    counts = {}
    with tempfile.TemporaryDirectory(prefix="lastbit-insn-") as tmp:
        x.tofile(os.path.join(tmp, "input_0.bin"))
        for repeat in (1, 3):
            log_path = Path(tmp) / f"qemu-{repeat}.log"
            cmd = [*prefix, "-d", "in_asm,exec,nochain", "-D", str(log_path),
                   str(bundle / "lastbit_run"), str(bundle), tmp, "--repeat", str(repeat), "--threads", "1"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
            counts[repeat] = count_instructions(log_path)
            log_path.unlink()
    return (counts[3] - counts[1]) // 2


def layer_model(name: str):
    """One layer of the zoo models, as its own torch module: ResNet-20's 3×3 conv + BN + ReLU
    at 32 channels, 14×14, and the MLP's 512 → 256 dense + ReLU."""
    import torch

    torch.manual_seed(0)
    if name == "conv3x3":
        module = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
                                     torch.nn.ReLU())
        x = torch.randn(1, 32, 14, 14)
    elif name == "dense":
        module = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU())
        x = torch.randn(1, 512)
    else:
        from lastbit.frontend.models import get_model

        module, x = get_model(name, pretrained=False)
    return module.eval(), x


# Kernels each layer is also forced onto: the strategy of a copy of the target (the cheapest
# listed kernel that serves the layer wins; the int8/reference-int fallbacks only when none does).
ALTERNATIVES = {
    "reference-int": ("reference-int",),
    "lut-neon": ("lut-neon", "lut-neon-v7"),
}


def bench(name: str, triple: str, workdir: Path) -> dict:
    """fp32 vs 3-bit with the target's own kernel choice, and 3-bit forced (through a copy of
    the target) onto each kernel of ALTERNATIVES: the data behind the ARM strategies."""
    import dataclasses

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
    f_insns = instructions_per_inference(fp32.export(workdir / f"{name}-{triple}-fp32"), x)
    q_insns = instructions_per_inference(quantized.export(workdir / f"{name}-{triple}-3bit"), x)
    row = {
        "layer": name,
        "target": triple,
        "kernels_3bit": sorted({layer.kernel for layer in quantized.report().layers}),
        "mflops": quantized.report().flops / 1e6,
        "insns_fp32": f_insns,
        "insns_3bit": q_insns,
        "ratio_3bit_vs_fp32": q_insns / f_insns if f_insns else None,
    }
    for label, kernels in ALTERNATIVES.items():
        forced = dataclasses.replace(target, kernels={"dense": kernels, "conv2d": kernels})
        artifact = lastbit.compile(module, forced, (example,), name=f"{name}-3bit-{label}", squeeze=squeeze)
        chosen = sorted({layer.kernel for layer in artifact.report().layers})
        insns = instructions_per_inference(artifact.export(workdir / f"{name}-{triple}-{label}"), x)
        key = label.replace("-", "_")
        row[f"insns_3bit_{key}"] = insns
        row[f"ratio_3bit_{key}_vs_fp32"] = insns / f_insns if f_insns else None
        row[f"kernels_3bit_{key}"] = chosen
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="aarch64 only, the two layers")
    parser.add_argument("--layers", nargs="*")
    args = parser.parse_args(argv)
    from results import update_section

    from lastbit.targets import get_target

    logging.basicConfig(level=logging.WARNING)
    triples = TARGETS[:1] if args.quick else TARGETS
    names = args.layers or LAYERS  # a whole model (--layers resnet20) logs gigabytes under qemu -d exec
    rows = []
    with tempfile.TemporaryDirectory(prefix="lastbit-insn-bundles-") as tmp:
        for triple in triples:
            missing = get_target(triple).missing_tools()
            if missing:
                print(f"skipping {triple}: needs {', '.join(missing)}")
                continue
            for name in names:
                row = bench(name, triple, Path(tmp))
                rows.append(row)
                keys = {label: label.replace("-", "_") for label in ALTERNATIVES}
                forced = "".join(
                    f"  {label} {row['insns_3bit_' + key]:>12,} ({row['ratio_3bit_' + key + '_vs_fp32']:.2f}x)"
                    for label, key in keys.items()
                )
                print(f"{name:<10} {triple:<24} fp32 {row['insns_fp32']:>12,} insns  3-bit {row['insns_3bit']:>12,}"
                      f" ({','.join(row['kernels_3bit'])}, {row['ratio_3bit_vs_fp32']:.2f}x){forced}")
    update_section("arm_insn_count", {"quick": args.quick, "method": "qemu -d in_asm,exec,nochain", "rows": rows})
    return rows


if __name__ == "__main__":
    main()

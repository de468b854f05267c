"""Estimated cycles from dynamic instruction counts, for ARM targets without a board.

A per-instruction-class *throughput* model of one in-order core (Cortex-A53) and one
out-of-order core (Cortex-A76): instructions counted under qemu-user
(:mod:`lastbit.codegen.qemu_count`) are sorted into classes (int ALU, int multiply, load,
store, branch, NEON integer ALU / multiply / dot product, FP ALU / FMA) and each class occupies
the pipelines that execute it; the estimate is the busiest pipeline group or the issue width,
whichever binds::

    cycles = max(N / issue_width, max_g Σ_{c ∈ g} n_c / pipes_g)

It ignores dependency stalls, cache misses and branch mispredictions, so it is a lower bound
that ranks kernels by the work they issue (what the co-design search needs), not a
prediction of board time. On the in-order A53 real code also stalls on latencies.

Sources (per core):
* Cortex-A53: LLVM's scheduling model ``llvm/lib/Target/AArch64/AArch64SchedA53.td``
  (derived, per its header, from Arm's "Cortex-A53 Software Optimisation Specification";
  Arm publishes no A53 optimisation guide): dual issue; 2 integer ALUs, 1 integer MAC,
  1 load/store, 1 branch, 1 FP/NEON ALU, 1 FP multiply/MAC pipe, each one instruction per
  cycle (128-bit NEON included). The A53 has no ``sdot`` (qemu's cortex-a53 refuses it);
  code for the dot-product variant is costed with sdot on the multiply pipe at one per cycle,
  standing in for its dot-product successor, the in-order Cortex-A55.
* Cortex-A76: Arm "Cortex-A76 Software Optimization Guide" (PJDOC-466751330-7215), §2
  pipelines and §3 instruction tables: decode 4 instructions a cycle; 2 single-cycle integer
  pipes + 1 multi-cycle (3 ALU ops or 1 multiply a cycle), 1 branch, 2 load/store address
  pipes (2 loads, 1 store data a cycle), 2 ASIMD/FP pipes V0/V1 (128-bit): ASIMD ALU, FP ALU,
  FMLA and SDOT/UDOT on either (2 a cycle), ASIMD integer multiply / multiply-accumulate
  (MUL, MLA, SMLAL, SMULL) on V0 only (1 a cycle).

i8mm code (``smmla``, 32 MACs) is costed as one dot-product-class instruction like ``sdot``:
neither core has i8mm, so this is an assumption standing in for an i8mm core (Cortex-A710,
Neoverse N2/V1), not taken from a guide.

armv7 code is costed on the same tables (the A53 runs AArch32 too; the A76 runs AArch32 at
EL0 only, so its armv7 numbers are notional).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

CLASSES = (
    "int_alu", "int_mul", "load", "store", "branch",
    "neon_alu", "neon_mul", "neon_dot", "fp_alu", "fp_fma", "other",
)

_BRANCH = re.compile(
    r"^(b|bl|blr|br|ret|cbz|cbnz|tbz|tbnz|bx|blx|b\.\w+|b(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le)(\.w|\.n)?)$"
)
_VECTOR_OPERAND = re.compile(r"\bv\d+\.|\bq\d+\b|\bd\d+\[|\{\s*[vdq]\d+")
_NEON_MUL = re.compile(
    r"^(v?(s|u)?ml[as]l2?|v?(s|u)?mull2?|v?mla|v?mls|v?mul|sqdmulh|sqrdmulh|sqdmull2?|vqdmulh|vqrdmulh)(\.[a-z0-9]+)*$"
)
_FP_FMA = re.compile(
    r"^(fmla|fmls|fmadd|fmsub|fnmadd|fnmsub|vfma|vfms|vmla\.f\d+|vmls\.f\d+|vfnma|vfnms)(\.[a-z0-9]+)*$"
)
_FP_OTHER = re.compile(r"^(f[a-z0-9]+|scvtf|ucvtf|vcvt.*|v(add|sub|mul|max|min|abs|neg|cmp|div|sqrt)\.f\d+.*)$")


def classify(mnemonic: str, operands: str = "") -> str:
    """The class of one disassembled instruction (qemu's aarch64 or arm/thumb syntax)."""
    m = mnemonic.lower()
    ops = operands.lower()
    if m in ("sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla") or m.startswith(("vsdot", "vudot")):
        return "neon_dot"
    if _BRANCH.match(m) or m in ("pop", "ldm") and "pc" in ops:
        return "branch"
    if m.startswith(("ld", "vld", "pop")):
        return "load"
    if m.startswith(("st", "vst", "push")) and not m.startswith("sta"):
        return "store"
    if _FP_FMA.match(m):
        return "fp_fma"
    if _FP_OTHER.match(m):  # scalar or vector FP: fadd, fmul, fcvt, scvtf, vadd.f32, vcvt ...
        return "fp_alu"
    if _VECTOR_OPERAND.search(ops) or m.startswith("v"):
        return "neon_mul" if _NEON_MUL.match(m) else "neon_alu"
    if m in ("mul", "madd", "msub", "smull", "umull", "smulh", "umulh", "smaddl", "umaddl", "sdiv", "udiv",
             "mla", "mls", "smlal", "umlal") or m.startswith(("mul", "smul", "umul")):
        return "int_mul"
    if m in ("nop", "hint", "svc", "dmb", "dsb", "isb", "mrs", "msr", "yield"):
        return "other"
    return "int_alu"


@dataclass(frozen=True)
class CoreModel:
    """``pipes``: pipeline group -> (how many, classes it executes); a class listed in two groups
    (A76 ASIMD multiply: any V pipe, and V0 only) loads both."""

    name: str
    issue_width: int
    pipes: dict
    description: str = ""

    def cycles(self, counts: "dict[str, float]") -> float:
        total = sum(counts.values())
        bound = total / self.issue_width
        for count, classes in self.pipes.values():
            bound = max(bound, sum(counts.get(c, 0) for c in classes) / count)
        return bound


CORES: dict[str, CoreModel] = {
    "cortex-a53": CoreModel(
        "cortex-a53", 2,
        {
            "alu": (2, ("int_alu",)),
            "mac": (1, ("int_mul",)),
            "ldst": (1, ("load", "store")),
            "branch": (1, ("branch",)),
            "fp_alu": (1, ("neon_alu", "fp_alu")),
            "fp_mac": (1, ("neon_mul", "neon_dot", "fp_fma")),
        },
        "in-order, dual issue (LLVM AArch64SchedA53.td)",
    ),
    "cortex-a76": CoreModel(
        "cortex-a76", 4,
        {
            "int": (3, ("int_alu", "int_mul")),
            "int_m": (1, ("int_mul",)),
            "ldst": (2, ("load", "store")),
            "store_data": (1, ("store",)),
            "branch": (1, ("branch",)),
            "v": (2, ("neon_alu", "neon_mul", "neon_dot", "fp_alu", "fp_fma")),
            "v0": (1, ("neon_mul",)),
        },
        "out-of-order, 4-wide decode (Arm Cortex-A76 Software Optimization Guide)",
    ),
}


def class_counts(mnemonics: "dict[tuple[str, str], int] | Counter") -> Counter:
    """Per-class counts from ``{(mnemonic, operands): executions}``."""
    out: Counter = Counter()
    for (mnemonic, operands), n in mnemonics.items():
        out[classify(mnemonic, operands)] += n
    return out


def estimate_cycles(counts, core: str = "cortex-a53") -> float:
    """Estimated cycles on ``core`` for per-class instruction counts (``{class: n}``), an
    :class:`~lastbit.codegen.qemu_count.InsnCounts`, or the path of a qemu
    ``-d in_asm,exec,nochain`` log."""
    from pathlib import Path

    from lastbit.errors import TargetError

    if core not in CORES:
        raise TargetError(f"no cycle model for core '{core}'; known: {', '.join(sorted(CORES))}")
    if isinstance(counts, (str, Path)):
        from lastbit.codegen.qemu_count import count_log

        counts = count_log(Path(counts))
    if hasattr(counts, "by_class"):
        counts = counts.by_class
    unknown = set(counts) - set(CLASSES)
    if unknown:
        raise TargetError(f"unknown instruction classes {sorted(unknown)}; known: {', '.join(CLASSES)}")
    return CORES[core].cycles(dict(counts))

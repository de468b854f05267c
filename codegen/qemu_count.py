"""Dynamic instruction counts of code run under qemu-user, per instruction class: the ARM
measurement when no board is at hand (with :mod:`lastbit.targets.arm_cycle_model` turning the
counts into estimated cycles). These are qemu counts, not board timings.

Debian's qemu 7.2 ships no TCG plugins, so the counts come from qemu's own logs: ``-d in_asm``
prints every translated block with its instructions, ``-d exec,nochain`` the guest PC of every
block executed (chaining off, so none is skipped); a block's instructions are counted once per
execution. Loader and runner start-up cancel out: :func:`count_bundle` runs the bundle with
``--repeat 1`` and ``--repeat 3`` and halves the difference (per inference).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_INSN = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{4,8}(?: [0-9a-f]{4})?)\s+(\S+)\s*(.*)$")
# (mask, value, mnemonic) of A64 encodings qemu 7.2's disassembler prints as ".byte"
_UNDECODED_A64 = (
    (0xBF20FC00, 0x0E009400, "sdot"),  # SDOT/UDOT (vector): bit 29 = U
    (0xBF00F400, 0x0F00E000, "sdot"),  # SDOT/UDOT (by element)
    (0xFFE0FC00, 0x4E80A400, "smmla"),  # SMMLA/UMMLA/USMMLA (i8mm)
)


def _mnemonic(word: str, mnemonic: str) -> str:
    """qemu's mnemonic, or the instruction its disassembler leaves as raw bytes."""
    if mnemonic.startswith("."):
        value = int(word.replace(" ", ""), 16)
        for mask, bits, name in _UNDECODED_A64:
            if value & (mask & ~0x20000000) == bits & ~0x20000000:
                return name
    return mnemonic


@dataclass
class InsnCounts:
    """Executed instructions: the total, per class (arm_cycle_model.CLASSES) and per mnemonic."""

    total: int = 0
    by_class: Counter = field(default_factory=Counter)
    by_mnemonic: Counter = field(default_factory=Counter)

    def __sub__(self, other: "InsnCounts") -> "InsnCounts":
        return InsnCounts(self.total - other.total, _diff(self.by_class, other.by_class),
                          _diff(self.by_mnemonic, other.by_mnemonic))

    def scaled(self, factor: float) -> "InsnCounts":
        """Counts divided by ``1/factor`` (rounded): per inference from a difference of runs."""
        return InsnCounts(round(self.total * factor), Counter({k: round(v * factor) for k, v in self.by_class.items()}),
                          Counter({k: round(v * factor) for k, v in self.by_mnemonic.items()}))

    def cycles(self, core: str) -> float:
        from lastbit.targets.arm_cycle_model import estimate_cycles

        return estimate_cycles(self.by_class, core)


def _diff(a: Counter, b: Counter) -> Counter:
    return Counter({k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b)})


def count_log(log_path: Path) -> InsnCounts:
    """Executed instructions from a qemu ``-d in_asm,exec,nochain`` log."""
    from lastbit.targets.arm_cycle_model import classify

    blocks: dict[int, list[tuple[str, str]]] = {}  # block start PC -> its instructions (latest translation)
    executed: Counter = Counter()  # block start PC -> executions
    current: list | None = None
    with open(log_path, errors="replace") as stream:
        for line in stream:
            if line.startswith("Trace"):
                parts = line.split("/", 2)
                if len(parts) == 3:
                    executed[int(parts[1], 16)] += 1
                continue
            if line.startswith("IN:"):
                current = None
                continue
            match = _INSN.match(line)
            if match:
                if current is None:
                    current = []
                    blocks[int(match.group(1), 16)] = current
                current.append((_mnemonic(match.group(2), match.group(3)), match.group(4).strip()))
            elif not line.strip():
                current = None
    counts = InsnCounts()
    classes: dict[tuple[str, str], str] = {}
    for pc, times in executed.items():
        for mnemonic, operands in blocks.get(pc, ()):
            key = (mnemonic, operands)
            if key not in classes:
                classes[key] = classify(mnemonic, operands)
            counts.by_class[classes[key]] += times
            counts.by_mnemonic[mnemonic] += times
            counts.total += times
    return counts


def count_bundle(bundle: Path, inputs: "list[np.ndarray]", timeout_s: float = 1800) -> InsnCounts:
    """Instructions per inference of a bundle under qemu: (run at --repeat 3) − (at --repeat 1),
    halved, so start-up cancels out."""
    from lastbit.codegen.bundle import _runner_prefix, load_manifest

    prefix = _runner_prefix(load_manifest(bundle))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lastbit-insn-") as tmp:
        for i, x in enumerate(inputs):
            np.ascontiguousarray(x).tofile(os.path.join(tmp, f"input_{i}.bin"))
        for repeat in (1, 3):
            log_path = Path(tmp) / f"qemu-{repeat}.log"
            cmd = [*prefix, "-d", "in_asm,exec,nochain", "-D", str(log_path),
                   str(bundle / "lastbit_run"), str(bundle), tmp, "--repeat", str(repeat), "--threads", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode:  # e.g. SIGILL: code for an extension the target's qemu cpu lacks
                from lastbit.errors import RunError

                raise RunError(f"counting {bundle} under {' '.join(prefix)}: exit {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:] or 'no output'}")
            runs[repeat] = count_log(log_path)
            log_path.unlink()
    return (runs[3] - runs[1]).scaled(0.5)


def count_kernels(cases, target, workdir: Path) -> InsnCounts:
    """Instructions per call of integer kernels alone: ``cases`` are (kernel, layer, codes, x)
    built into one bundle (``kernels.common.kernels_module``) for ``target`` and run under qemu."""
    from lastbit.codegen.bundle import build_bundle
    from lastbit.codegen.kernels.common import kernels_module
    from lastbit.targets import get_target

    target = get_target(target)
    mod = kernels_module([(k, layer, codes) for k, layer, codes, _ in cases], target.feature_set())
    bundle = build_bundle(mod, target, Path(workdir) / f"kernels-{target.triple}")
    return count_bundle(bundle, [x for *_, x in cases])

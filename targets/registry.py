"""Target registry: every hardware target lastbit compiles for, keyed by target triple.

A target is data plus a few hooks (see docs/TARGETS.md).  Each module in this package
calls :func:`register` at import time; the package imports all of its modules, so adding
hardware means adding one file and nothing else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Callable

from lastbit.errors import TargetError


@dataclass(frozen=True)
class Target:
    """What lastbit needs to know to compile for, and run on, one kind of hardware.

    ``runner`` says how compiled code runs there: ``"host"`` (this process, TVM's VM),
    ``"qemu"`` (the bundle runner cross-compiled and run under qemu-user), ``"rpc"`` or
    ``"sim"`` (a simulator).  ``kernels`` maps a quantized op kind ("dense", "conv2d") to
    integer kernel names (``codegen/kernels``) in order of preference; the first whose
    ``supports`` accepts a layer serves it, then the "int8" and "reference-int" fallbacks
    (``codegen/quant_lowering.py``).  The fp32 path ignores it.
    """

    triple: str
    description: str
    tvm_target: dict | Callable[[], dict]
    features: frozenset[str] | Callable[[], frozenset[str]] = frozenset()
    cross_cc: str | None = None  # C compiler that links shared libraries for the target
    runner: str = "host"
    qemu: str | None = None  # qemu-user binary, when runner == "qemu"
    qemu_cpu: str | None = None  # qemu -cpu model: one with exactly the target's extensions
    sysroot: str | None = None  # passed to qemu as -L
    kernels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    apt_packages: tuple[str, ...] = ()  # Debian packages that provide the toolchain

    def tvm(self):
        """The TVM ``Target`` object."""
        import tvm

        spec = self.tvm_target() if callable(self.tvm_target) else self.tvm_target
        return tvm.target.Target(spec)

    def feature_set(self) -> frozenset[str]:
        return frozenset(self.features()) if callable(self.features) else frozenset(self.features)

    @property
    def is_host(self) -> bool:
        return self.runner == "host"

    def missing_tools(self) -> list[str]:
        """Executables this target needs that are not on PATH (empty when ready)."""
        need = [t for t in (self.cross_cc, self.qemu) if t]
        return [t for t in need if shutil.which(t) is None]


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target to the registry (a target file calls this at import time)."""
    if target.triple in _REGISTRY and _REGISTRY[target.triple] != target:
        raise TargetError(f"target '{target.triple}' is registered twice")
    _REGISTRY[target.triple] = target
    return target


def get_target(triple: "str | Target") -> Target:
    """Look a target up by triple; unknown triples raise a TargetError listing the known ones."""
    if isinstance(triple, Target):
        return triple
    try:
        return _REGISTRY[triple]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise TargetError(f"unknown target '{triple}'; known targets: {known}") from None


def list_targets() -> list[Target]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]

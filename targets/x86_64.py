"""The x86-64 Linux host: code runs in this process; -mcpu and vector features are detected."""

from __future__ import annotations

import functools
import os

from lastbit.targets.registry import Target, register


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host_cpu()})
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(target))


def _tvm_target() -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1}


def _features() -> frozenset[str]:
    wanted = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vpopcntdq", "popcnt"}
    return frozenset(host_features() & wanted)


X86_64 = register(
    Target(
        triple="x86_64-linux-gnu",
        description="x86-64 Linux host (AVX2/AVX-512 detected from the CPU)",
        tvm_target=_tvm_target,
        features=_features,
        cross_cc=None,
        runner="host",
    )
)

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
        # Fastest first, as measured per kernel on this host (benchmarks/quant_e2e.py, section
        # kernels_1thread): table lookup and VNNI for dense; for conv2d the direct VNNI conv
        # (benchmarks/conv_vnni.py: faster than our fp32 conv on the ResNet-18 layers), then
        # reference-int for what it declines (grouped/depthwise convs, CPUs without VNNI).
        kernels={
            "dense": ("lut", "int8-vnni", "bitserial", "int8", "shift-add"),
            "conv2d": ("int8-vnni-conv", "reference-int", "bitserial"),
        },
    )
)

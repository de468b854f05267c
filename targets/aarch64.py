"""64-bit ARM Linux (Cortex-A53 class and up) with NEON; runs under qemu-user here."""

from lastbit.targets.registry import Target, register

AARCH64 = register(
    Target(
        triple="aarch64-linux-gnu",
        description="64-bit ARM Linux with NEON (e.g. Raspberry Pi 3/4, Jetson); qemu-aarch64 here",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 1},
        features=frozenset({"neon", "popcount", "aarch64"}),  # "aarch64": which NEON (lut-neon kernels)
        cross_cc="aarch64-linux-gnu-gcc",
        runner="qemu",
        # Fewest instructions first, as counted under qemu (benchmarks/arm_insn_count.py):
        # int8 for dense, the plain int8 kernel for conv2d (the shift-add one runs ~25x more).
        kernels={
            "dense": ("int8", "reference-int", "bitserial", "shift-add"),
            "conv2d": ("reference-int", "bitserial"),
        },
        qemu="qemu-aarch64",
        sysroot="/usr/aarch64-linux-gnu",
        apt_packages=("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user"),
    )
)

"""32-bit ARMv7-A Linux, hard-float ABI, with NEON; runs under qemu-user here."""

from lastbit.targets.registry import Target, register

ARMV7 = register(
    Target(
        triple="armv7a-linux-gnueabihf",
        description="32-bit ARMv7-A Linux with NEON (e.g. Raspberry Pi 2, Cortex-A7/A9); qemu-arm here",
        tvm_target={
            "kind": "llvm",
            "mtriple": "armv7a-linux-gnueabihf",
            "mattr": ["+neon", "+vfp4", "+thumb2"],
            "mfloat-abi": "hard",
            "num-cores": 1,
        },
        features=frozenset({"neon", "popcount", "armv7"}),  # "armv7": which NEON (lut-neon kernels)
        cross_cc="arm-linux-gnueabihf-gcc",
        runner="qemu",
        # The plain aarch64 order (benchmarks/arm_insn_count.py counts both ARM targets).
        kernels={
            "dense": ("int8-smlal-v7", "int8", "reference-int", "bitserial", "shift-add"),
            "conv2d": ("int8-smlal-v7", "reference-int", "bitserial"),
        },
        qemu_cpu="cortex-a15",  # an ARMv7-A core with NEON and VFPv4
        qemu="qemu-arm",
        sysroot="/usr/arm-linux-gnueabihf",
        apt_packages=("gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross", "qemu-user"),
    )
)

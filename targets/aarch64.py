"""64-bit ARM Linux with NEON, two variants; both run under qemu-user here.

* ``aarch64-linux-gnu``: plain armv8-a (Cortex-A53/A72 class: Raspberry Pi 3/4, Jetson Nano).
  qemu runs it as a Cortex-A53, so an instruction that core lacks (``sdot``) stops with SIGILL
  instead of passing unnoticed.
* ``aarch64-dotprod-linux-gnu``: armv8.2-a with the dot-product extension (``+dotprod``:
  Cortex-A55/A76 and later, Raspberry Pi 5, Graviton 2+); int8 layers use ``sdot``. qemu runs it
  as a Cortex-A76. The LLVM triple is still ``aarch64-linux-gnu``; the name picks the features.
* ``aarch64-i8mm-linux-gnu``: armv8.6-a with dot product and the int8 matrix-multiply extension
  (``+i8mm``: Cortex-A710/X2, Neoverse V1/N2, Graviton 3); int8 layers may use ``smmla`` (2×2
  pixel × channel tiles, 32 MACs an instruction). qemu 7.2 has no i8mm core model, so it runs
  as ``-cpu max`` (every extension qemu implements).
"""

from lastbit.targets.registry import Target, register

_COMMON = dict(
    cross_cc="aarch64-linux-gnu-gcc",
    runner="qemu",
    qemu="qemu-aarch64",
    sysroot="/usr/aarch64-linux-gnu",
    apt_packages=("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user"),
)

AARCH64 = register(
    Target(
        triple="aarch64-linux-gnu",
        description="64-bit ARM Linux with NEON, armv8-a (e.g. Raspberry Pi 3/4, Jetson); qemu-aarch64 here",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 1},
        features=frozenset({"neon", "popcount", "aarch64"}),  # "aarch64": which NEON (lut-neon kernels)
        # Fewest instructions first, as counted under qemu (benchmarks/arm_insn_count.py): the
        # int16-partial-sum kernel (int8-smlal) for low-bit codes, then the plain int8 kernels.
        kernels={
            "dense": ("int8-smlal", "int8", "reference-int", "bitserial", "shift-add"),
            "conv2d": ("int8-smlal", "reference-int", "bitserial"),
        },
        qemu_cpu="cortex-a53",
        **_COMMON,
    )
)

AARCH64_DOTPROD = register(
    Target(
        triple="aarch64-dotprod-linux-gnu",
        description="64-bit ARM Linux, armv8.2-a + dot product (Raspberry Pi 5, Cortex-A55/A76); qemu-aarch64 here",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 1},
        features=frozenset({"neon", "popcount", "aarch64", "dotprod"}),
        # sdot serves every int8-fitting dense/conv2d (groups = 1); int16 partial sums next; the
        # tbl-decoded sdot (fewer weight bytes, more instructions) only where the cost table says
        kernels={
            "dense": ("int8-sdot", "int8-smlal", "lut-sdot", "int8", "reference-int", "bitserial", "shift-add"),
            "conv2d": ("int8-sdot", "int8-smlal", "lut-sdot", "reference-int", "bitserial"),
        },
        qemu_cpu="cortex-a76",
        **_COMMON,
    )
)

AARCH64_I8MM = register(
    Target(
        triple="aarch64-i8mm-linux-gnu",
        description="64-bit ARM Linux, armv8.6-a + dot product + int8 matmul (Cortex-A710/X2, Neoverse V1/N2, "
                    "Graviton 3); qemu-aarch64 -cpu max here",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"],
                    "num-cores": 1},
        features=frozenset({"neon", "popcount", "aarch64", "dotprod", "i8mm"}),
        # smmla where the cost table says it issues fewer instructions than sdot (it pays for a
        # spare pixel on odd rows and a spare row on batch-1 dense layers), sdot behind it
        kernels={
            "dense": ("int8-smmla", "int8-sdot", "int8-smlal", "lut-sdot", "int8", "reference-int", "bitserial",
                      "shift-add"),
            "conv2d": ("int8-smmla", "int8-sdot", "int8-smlal", "lut-sdot", "reference-int", "bitserial"),
        },
        qemu_cpu="max",
        **_COMMON,
    )
)

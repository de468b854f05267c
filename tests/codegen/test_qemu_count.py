"""Instruction counts from qemu logs (codegen/qemu_count.py): a synthetic log, and one real
run of a tiny bundle under qemu."""

from collections import Counter

import numpy as np
import pytest

from lastbit.codegen.qemu_count import InsnCounts, count_log

LOG = """\
IN: 
0x0000005500001000:  4e809420  .byte    0x20, 0x94, 0x80, 0x4e
0x0000005500001004:  91000421  add      x1, x1, #1
0x0000005500001008:  54ffffc1  b.ne     #0x5500001000

IN: 
0x0000005500002000:  d65f03c0  ret      

Trace 0: 0x7f0000000100 [0000000001009331/0000005500001000/00000001/00000200] 
Trace 0: 0x7f0000000100 [0000000001009331/0000005500001000/00000001/00000200] 
Trace 0: 0x7f0000000100 [0000000001009331/0000005500001000/00000001/00000200] 
Trace 0: 0x7f0000000200 [0000000001009331/0000005500002000/00000001/00000200] 
"""


def test_count_log_counts_each_block_per_execution(tmp_path):
    path = tmp_path / "qemu.log"
    path.write_text(LOG)
    counts = count_log(path)
    assert counts.total == 3 * 3 + 1
    # qemu 7.2 prints sdot as raw bytes: the count names it from the encoding
    assert counts.by_mnemonic["sdot"] == 3
    assert counts.by_class == Counter({"neon_dot": 3, "int_alu": 3, "branch": 4})


def test_difference_of_runs_is_per_inference():
    one = InsnCounts(100, Counter({"int_alu": 60, "load": 40}), Counter({"add": 60, "ldr": 40}))
    three = InsnCounts(300, Counter({"int_alu": 180, "load": 120}), Counter({"add": 180, "ldr": 120}))
    per = (three - one).scaled(0.5)
    assert per.total == 100 and per.by_class["load"] == 40


@pytest.mark.qemu
def test_count_kernels_under_qemu(tmp_path):
    """sdot kernel on the dot-product variant: the count sees exactly one sdot per 16 MACs."""
    from lastbit.codegen.kernels import IntLayer, get_kernel
    from lastbit.codegen.qemu_count import count_kernels
    from lastbit.targets import get_target

    target = get_target("aarch64-dotprod-linux-gnu")
    if target.missing_tools():
        pytest.skip("needs the aarch64 toolchain and qemu")
    rng = np.random.default_rng(0)
    layer = IntLayer("dense", "pow2-4", 3, (1, 64), (32, 64))
    codes = rng.choice([-4, -2, -1, 0, 1, 2, 4], size=(32, 64)).astype(np.int8)
    x = rng.integers(-127, 128, size=(1, 64), dtype=np.int8)
    counts = count_kernels([(get_kernel("int8-sdot"), layer, codes, x)], target, tmp_path)
    assert counts.by_mnemonic["sdot"] == 32 * 64 // 16
    assert counts.cycles("cortex-a53") >= counts.cycles("cortex-a76") > 0

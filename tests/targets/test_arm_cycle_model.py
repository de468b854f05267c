"""The ARM cycle model: instruction classes, and cycles that follow each core's pipelines."""

import pytest

from lastbit.errors import TargetError
from lastbit.targets.arm_cycle_model import CLASSES, classify, estimate_cycles


@pytest.mark.parametrize(
    "mnemonic, operands, cls",
    [
        ("sdot", "v0.4s, v1.16b, v2.16b", "neon_dot"),
        ("smlal2", "v0.8h, v1.16b, v2.16b", "neon_mul"),
        ("vmlal.s8", "q0, d1, d2", "neon_mul"),
        ("fmla", "v0.4s, v1.4s, v2.s[0]", "fp_fma"),
        ("vmla.f32", "q0, q1, d2[0]", "fp_fma"),
        ("ld1r", "{ v25.4s }, [x14], #4", "load"),
        ("vld1.8", "{d0[]}, [r0]", "load"),
        ("stp", "q0, q1, [x0]", "store"),
        ("add", "x1, x2, x3", "int_alu"),
        ("add", "v0.4s, v1.4s, v2.4s", "neon_alu"),
        ("saddw2", "v0.4s, v0.4s, v1.8h", "neon_alu"),
        ("mul", "x0, x1, x2", "int_mul"),
        ("b.ne", "#0x40", "branch"),
        ("bne", "#0x40", "branch"),
        ("bic", "x0, x1, x2", "int_alu"),
        ("fadd", "s0, s1, s2", "fp_alu"),
    ],
)
def test_classify(mnemonic, operands, cls):
    assert classify(mnemonic, operands) == cls


def test_cycles_follow_the_pipelines():
    # 100 sdot: the A76 issues two a cycle (V0/V1), the in-order model one
    assert estimate_cycles({"neon_dot": 100}, "cortex-a76") == pytest.approx(50)
    assert estimate_cycles({"neon_dot": 100}, "cortex-a53") == pytest.approx(100)
    # integer NEON multiply-accumulate is V0-only on the A76: no faster than one a cycle
    assert estimate_cycles({"neon_mul": 100}, "cortex-a76") == pytest.approx(100)
    # issue width binds a mix spread over many pipes
    mix = {"int_alu": 40, "load": 20, "branch": 10, "fp_fma": 20, "neon_alu": 10}
    assert estimate_cycles(mix, "cortex-a53") == pytest.approx(50)  # 100 insns, dual issue
    assert estimate_cycles(mix, "cortex-a76") == pytest.approx(25)  # 4-wide
    # the in-order core is never faster than the out-of-order one on the same counts
    for cls in CLASSES:
        assert estimate_cycles({cls: 64}, "cortex-a53") >= estimate_cycles({cls: 64}, "cortex-a76")


def test_unknown_core_or_class_is_named():
    with pytest.raises(TargetError, match="cortex-m4"):
        estimate_cycles({"int_alu": 1}, "cortex-m4")
    with pytest.raises(TargetError, match="simd"):
        estimate_cycles({"simd": 1}, "cortex-a53")

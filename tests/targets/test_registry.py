"""The target registry: known triples, TVM targets, and the error an unknown one gets."""

import pytest

import lastbit
from lastbit.errors import TargetError
from lastbit.targets import get_target, list_targets


def test_required_targets_are_registered():
    triples = {t.triple for t in list_targets()}
    assert {"x86_64-linux-gnu", "aarch64-linux-gnu", "armv7a-linux-gnueabihf"} <= triples


def test_host_target_records_cpu_and_vector_features():
    host = get_target("x86_64-linux-gnu")
    tvm_target = host.tvm()
    assert str(tvm_target.attrs["mcpu"]) not in ("", "generic")
    assert "avx2" in host.feature_set() or "avx512f" in host.feature_set()


@pytest.mark.parametrize("triple,arch", [("aarch64-linux-gnu", "aarch64"), ("aarch64-dotprod-linux-gnu", "aarch64"),
                                         ("armv7a-linux-gnueabihf", "armv7")])
def test_arm_targets_declare_cross_toolchain(triple, arch):
    target = get_target(triple)
    assert target.runner == "qemu" and target.cross_cc and target.qemu
    assert arch in str(target.tvm().attrs["mtriple"])
    assert "neon" in target.feature_set()


def test_unknown_triple_lists_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("riscv64-linux-gnu")
    assert "riscv64-linux-gnu" in str(info.value) and "aarch64-linux-gnu" in str(info.value)
    with pytest.raises(TargetError):
        lastbit.compile("whatever.onnx", target="sparc-sun-solaris")


def test_dotprod_variant_adds_sdot_and_keeps_the_plain_path():
    plain, dot = get_target("aarch64-linux-gnu"), get_target("aarch64-dotprod-linux-gnu")
    assert "+dotprod" in list(dot.tvm().attrs["mattr"]) and "+dotprod" not in list(plain.tvm().attrs["mattr"])
    assert "dotprod" in dot.feature_set() and "dotprod" not in plain.feature_set()
    assert dot.kernels["conv2d"][0] == "int8-sdot" and "int8-sdot" not in plain.kernels["conv2d"]
    # qemu runs each as a core with exactly its extensions (the A53 refuses sdot)
    assert (plain.qemu_cpu, dot.qemu_cpu) == ("cortex-a53", "cortex-a76")


def test_i8mm_variant_adds_smmla_ahead_of_sdot():
    dot, i8mm = get_target("aarch64-dotprod-linux-gnu"), get_target("aarch64-i8mm-linux-gnu")
    assert "+i8mm" in list(i8mm.tvm().attrs["mattr"]) and "+i8mm" not in list(dot.tvm().attrs["mattr"])
    assert {"dotprod", "i8mm"} <= i8mm.feature_set() and "i8mm" not in dot.feature_set()
    assert i8mm.kernels["conv2d"][:2] == ("int8-smmla", "int8-sdot") and "int8-smmla" not in dot.kernels["conv2d"]
    assert i8mm.qemu_cpu == "max"  # qemu 7.2 has no core model with i8mm

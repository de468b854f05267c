"""The bundle format: plan extraction, build, and the C runner on the host and under qemu-user."""

import dataclasses
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from lastbit.codegen.bundle import (
    build_bundle,
    extract_plan,
    load_manifest,
    run_bundle,
    time_bundle,
)
from lastbit.errors import ArtifactError, RunError, TargetError, UnsupportedOpError
from lastbit.targets import get_target
from tests.conftest import SmallCNN, SmallMLP, _randomize_bn, assert_close

HOST = "x86_64-linux-gnu"
ARM_TARGETS = ["aarch64-linux-gnu", "armv7a-linux-gnueabihf"]
ELF_MACHINE = {"aarch64-linux-gnu": (64, 183), "armv7a-linux-gnueabihf": (32, 40)}  # EM_AARCH64, EM_ARM


def _elf_machine(path):
    """(word size, e_machine) from an ELF header."""
    header = path.read_bytes()[:20]
    return {1: 32, 2: 64}[header[4]], int.from_bytes(header[18:20], "little")


def _lower(model, *inputs):
    from lastbit.codegen.lowering import lower_to_tir
    from lastbit.frontend.torch_import import from_torch

    return lower_to_tir(from_torch(model, inputs))


def _reference(model, *inputs):
    with torch.no_grad():
        out = model(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _case(model, *inputs):
    """(lowered module, numpy inputs, torch reference outputs)"""
    return _lower(model, *inputs), [x.numpy() for x in inputs], _reference(model, *inputs)


class TwoHeads(torch.nn.Module):
    """Returns two tensors: the bundle's outputs must come back in that order."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(12, 16)
        self.cls = torch.nn.Linear(16, 3)
        self.box = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), torch.sigmoid(self.box(h))


class WideMLP(torch.nn.Module):
    """Big enough intermediates (8 KiB) that TVM asks the runtime for workspace memory; erf and
    exp come from libm."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 5)

    def forward(self, x):
        return torch.sigmoid(self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _parallelize_matmuls(mod):
    """What a CPU schedule does: run the outer loop of every matmul block in parallel."""
    from tvm import s_tir, tirx

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        try:
            block = sch.get_sblock("matmul")
        except Exception:  # this PrimFunc has no matmul
            continue
        sch.parallel(sch.get_loops(block)[0])
        mod[gv] = sch.mod["main"]
    return mod


@pytest.fixture(scope="module")
def cnn_case():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("float32"))
    return _case(model, x)


@pytest.fixture(scope="module")
def mlp_case():
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 32)).astype("float32"))
    return _case(SmallMLP().eval(), x)


@pytest.fixture(scope="module")
def parallel_case():
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((32, 64)).astype("float32"))
    mod, inputs, expected = _case(WideMLP().eval(), x)
    return _parallelize_matmuls(mod), inputs, expected


@pytest.fixture(scope="module")
def cnn_bundle(cnn_case, tmp_path_factory):
    mod, _, _ = cnn_case
    return build_bundle(mod, HOST, tmp_path_factory.mktemp("cnn") / "bundle", name="cnn")


def _copy(bundle, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _resign(bundle, *files):
    """Update the manifest's sha256 of edited files, to get past the Python-side check and
    exercise the runner's own checks."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in files:
        manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _needs_qemu(triple):
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)} (cross toolchain / qemu-user not installed)")


# --------------------------------------------------------------------------------------
# Plan


def test_plan_lists_buffers_steps_and_aligned_params(cnn_case):
    mod, inputs, _ = cnn_case
    plan = extract_plan(mod)
    kinds = [b.kind for b in plan.buffers]
    assert kinds[0] == "input" and plan.inputs == [0]
    assert plan.buffers[0].shape == inputs[0].shape
    assert [plan.buffers[i].kind for i in plan.outputs] == ["output"]
    assert plan.buffers[plan.outputs[0]].shape == (1, 10)
    assert set(kinds) <= {"input", "const", "temp", "output"}
    # every step writes its last argument, and reads only buffers that exist by then
    written = {i for i, k in enumerate(kinds) if k in ("input", "const")}
    for step in plan.steps:
        assert set(step.args[:-1]) <= written, step
        written.add(step.args[-1])
    offsets = plan.param_offsets()
    assert all(off % 64 == 0 for off in offsets.values())
    assert len(plan.params_blob()) == plan.params_bytes
    text = plan.to_text()
    assert text.startswith("lastbit-plan 1\n") and text.endswith("end\n")


def test_plan_rejects_ops_other_than_call_tir():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with pytest.raises(UnsupportedOpError, match=r"relax\.nn\.relu.*cannot be placed in a bundle"):
        extract_plan(bb.get())


def _reshape_module():
    """x -> call_tir(2x) -> R.reshape -> call_tir(+1); returns (the +1 result, the reshape view)."""
    from tvm import relax, te

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            doubled = bb.emit_te(lambda a: te.compute(a.shape, lambda i, j: a[i, j] * 2.0), x)
            view = bb.emit(relax.op.reshape(doubled, (3, 4)))
            plus = bb.emit_te(lambda a: te.compute(a.shape, lambda i, j: a[i, j] + 1.0), view)
            out = bb.emit_output(relax.Tuple([plus, view]))
        bb.emit_func_output(out)
    return bb.get()


def test_reshape_is_a_view_and_can_be_an_output(tmp_path):
    mod = _reshape_module()
    plan = extract_plan(mod)
    views = [b for b in plan.buffers if b.kind == "view"]
    assert len(views) == 1 and plan.outputs[1] == views[0].id
    x = np.arange(12, dtype="float32").reshape(2, 6)
    plus, view = run_bundle(build_bundle(mod, HOST, tmp_path / "b"), [x])
    np.testing.assert_array_equal(view, (2 * x).reshape(3, 4))
    np.testing.assert_array_equal(plus, (2 * x).reshape(3, 4) + 1)


# --------------------------------------------------------------------------------------
# Host


def test_cnn_bundle_matches_torch_on_host(cnn_case, cnn_bundle):
    _, inputs, expected = cnn_case
    (out,) = run_bundle(cnn_bundle, inputs)
    assert out.shape == expected[0].shape and out.dtype == np.float32
    assert_close(out, expected[0])


def test_mlp_bundle_matches_torch_on_host(mlp_case, tmp_path):
    mod, inputs, expected = mlp_case
    (out,) = run_bundle(build_bundle(mod, HOST, tmp_path / "mlp"), inputs)
    assert_close(out, expected[0])


def test_tuple_outputs_come_back_in_order(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 12)
    mod, inputs, expected = _case(TwoHeads().eval(), x)
    bundle = build_bundle(mod, HOST, tmp_path / "two")
    manifest = load_manifest(bundle)
    assert [o["shape"] for o in manifest["outputs"]] == [[2, 3], [2, 4]]
    outs = run_bundle(bundle, inputs)
    assert len(outs) == 2
    for out, ref in zip(outs, expected):
        assert_close(out, ref)


def test_parallel_kernels_with_workspace_on_host(parallel_case, tmp_path):
    mod, inputs, expected = parallel_case
    bundle = build_bundle(mod, HOST, tmp_path / "par")
    symbols = subprocess.run(["nm", "-D", str(bundle / "kernels.so")], capture_output=True, text=True).stdout
    assert "__TVMBackendParallelLaunch" in symbols and "__TVMBackendAllocWorkspace" in symbols
    for threads in (1, 2, 3):
        (out,) = run_bundle(bundle, inputs, threads=threads)
        assert_close(out, expected[0])
    timing = time_bundle(bundle, inputs, repeat=3, threads=2)
    assert len(timing.runs_ms) == 3 and timing.threads == 2
    assert 0 < timing.median_ms < 1000


def test_manifest_describes_the_bundle(cnn_case, cnn_bundle):
    manifest = load_manifest(cnn_bundle)
    assert manifest["target"] == HOST and manifest["name"] == "cnn"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "output0", "shape": [1, 10], "dtype": "float32"}]
    assert set(manifest["versions"]) >= {"lastbit", "tvm", "numpy"}
    assert {"kernels.so", "plan.txt", "params.bin", "lastbit_run"} <= set(manifest["files"])
    assert manifest["params_bytes"] == (cnn_bundle / "params.bin").stat().st_size


def test_extra_manifest_is_merged_but_cannot_overwrite(mlp_case, tmp_path):
    mod, _, _ = mlp_case
    bundle = build_bundle(mod, HOST, tmp_path / "b", extra_manifest={"squeeze": {"bits": 3}})
    assert load_manifest(bundle)["squeeze"] == {"bits": 3}
    with pytest.raises(ValueError, match="target"):
        build_bundle(mod, HOST, tmp_path / "c", extra_manifest={"target": "x"})
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------
# Bad inputs, bad bundles, failed builds


def test_wrong_inputs_raise_run_error_naming_the_input(cnn_bundle):
    good = np.zeros((1, 3, 8, 8), "float32")
    expected = r"input 'x' \(#0\): expected shape \(1, 3, 8, 8\) float32, got \(1, 3, 9, 9\)"
    with pytest.raises(RunError, match=expected):
        run_bundle(cnn_bundle, [np.zeros((1, 3, 9, 9), "float32")])
    with pytest.raises(RunError, match="expected shape .* float32, got .* float64"):
        run_bundle(cnn_bundle, [good.astype("float64")])
    with pytest.raises(RunError, match="takes 1 input"):
        run_bundle(cnn_bundle, [good, good])


@pytest.mark.parametrize("damage", ["corrupt kernels", "missing kernels", "truncated params"])
def test_damaged_bundle_raises_artifact_error_naming_the_file(cnn_bundle, tmp_path, damage):
    bundle = _copy(cnn_bundle, tmp_path)
    if damage == "corrupt kernels":
        (bundle / "kernels.so").write_bytes(b"\x7fELF not really")
        expected = "kernels.so"
    elif damage == "missing kernels":
        (bundle / "kernels.so").unlink()
        expected = "kernels.so"
    else:
        params = (bundle / "params.bin").read_bytes()
        (bundle / "params.bin").write_bytes(params[: len(params) // 2])
        expected = "params.bin"
    with pytest.raises(ArtifactError, match=expected):
        run_bundle(bundle, [np.zeros((1, 3, 8, 8), "float32")])


@pytest.mark.parametrize("name", ["params.bin", "kernels.so", "plan.txt"])
def test_runner_checks_truncated_files_itself(cnn_bundle, tmp_path, name):
    """With the manifest re-signed, the C runner's own checks must still name the file."""
    bundle = _copy(cnn_bundle, tmp_path)
    data = (bundle / name).read_bytes()
    (bundle / name).write_bytes(data[: len(data) // 2])
    _resign(bundle, name)
    with pytest.raises(ArtifactError, match=name):
        run_bundle(bundle, [np.zeros((1, 3, 8, 8), "float32")])


def test_kernel_error_message_reaches_run_error(cnn_bundle, tmp_path):
    """A plan that disagrees with the kernels: the generated argument check fails and its
    message (set through TVMFFIErrorSetRaisedFromCStrParts) is in the RunError."""
    bundle = _copy(cnn_bundle, tmp_path)
    plan = (bundle / "plan.txt").read_text().splitlines()
    idx = next(i for i, line in enumerate(plan) if " temp float32 2 32 1 4 1 8 8 8 " in line)
    plan[idx] = plan[idx].replace(" 4 1 8 8 8 ", " 4 1 8 4 16 ")  # same bytes, wrong shape
    (bundle / "plan.txt").write_text("\n".join(plan) + "\n")
    _resign(bundle, "plan.txt")
    with pytest.raises(RunError, match=r"step \d+ \(\w+\) failed: .*(shape|Shape)"):
        run_bundle(bundle, [np.zeros((1, 3, 8, 8), "float32")])


def test_crashing_runner_raises_run_error_with_stderr(cnn_bundle, tmp_path):
    bundle = _copy(cnn_bundle, tmp_path)
    (bundle / "lastbit_run").write_text("#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n")
    _resign(bundle, "lastbit_run")
    with pytest.raises(RunError, match=r"killed by signal 11: about to crash"):
        run_bundle(bundle, [np.zeros((1, 3, 8, 8), "float32")])


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_build_leaves_nothing_and_keeps_the_old_bundle(mlp_case, tmp_path):
    mod, inputs, expected = mlp_case
    broken = dataclasses.replace(get_target(HOST), cross_cc="false")  # a "compiler" that always fails
    with pytest.raises(TargetError, match="false"):
        build_bundle(mod, broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path, "new") == []

    old = build_bundle(mod, HOST, tmp_path / "old")
    before = load_manifest(old)["files"]
    with pytest.raises(TargetError):
        build_bundle(mod, broken, old)
    assert load_manifest(old)["files"] == before
    assert_close(run_bundle(old, inputs)[0], expected[0])
    assert _leftovers(tmp_path, "old") == []


def test_rebuild_replaces_an_existing_bundle(mlp_case, cnn_case, tmp_path):
    dest = build_bundle(mlp_case[0], HOST, tmp_path / "b", name="first")
    mod, inputs, expected = cnn_case
    build_bundle(mod, HOST, dest, name="second")
    assert load_manifest(dest)["name"] == "second"
    assert_close(run_bundle(dest, inputs)[0], expected[0])
    assert _leftovers(tmp_path, "b") == []


def test_rebuild_refuses_a_bundle_folder_holding_the_users_files(mlp_case, tmp_path):
    dest = build_bundle(mlp_case[0], HOST, tmp_path / "b", name="first")
    (dest / "notes.txt").write_text("mine")
    (dest / "inputs").mkdir()
    with pytest.raises(ArtifactError) as info:
        build_bundle(mlp_case[0], HOST, dest, name="second")
    message = str(info.value)
    assert str(dest) in message and "notes.txt" in message and "inputs/" in message and "move them out" in message
    assert (dest / "notes.txt").read_text() == "mine" and load_manifest(dest)["name"] == "first"
    assert _leftovers(tmp_path, "b") == []


def test_build_refuses_to_replace_a_directory_that_is_not_a_bundle(mlp_case, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="not a lastbit bundle"):
        build_bundle(mlp_case[0], HOST, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_missing_cross_compiler_is_a_target_error(mlp_case, tmp_path):
    nowhere = dataclasses.replace(get_target("aarch64-linux-gnu"), cross_cc="no-such-gcc-lastbit")
    with pytest.raises(TargetError, match="no-such-gcc-lastbit"):
        build_bundle(mlp_case[0], nowhere, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# ARM under qemu-user


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM_TARGETS)
def test_models_match_torch_under_qemu(triple, cnn_case, mlp_case, tmp_path):
    _needs_qemu(triple)
    for label, (mod, inputs, expected) in {"cnn": cnn_case, "mlp": mlp_case}.items():
        bundle = build_bundle(mod, triple, tmp_path / label)
        assert _elf_machine(bundle / "lastbit_run") == _elf_machine(bundle / "kernels.so") == ELF_MACHINE[triple]
        (out,) = run_bundle(bundle, inputs)
        assert_close(out, expected[0])


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM_TARGETS)
def test_parallel_kernels_and_tuple_outputs_under_qemu(triple, parallel_case, tmp_path):
    _needs_qemu(triple)
    mod, inputs, expected = parallel_case
    bundle = build_bundle(mod, triple, tmp_path / "par")
    for threads in (1, 2):
        (out,) = run_bundle(bundle, inputs, threads=threads)
        assert_close(out, expected[0])
    x = np.arange(12, dtype="float32").reshape(2, 6)
    plus, view = run_bundle(build_bundle(_reshape_module(), triple, tmp_path / "tuple"), [x])
    np.testing.assert_array_equal(view, (2 * x).reshape(3, 4))
    np.testing.assert_array_equal(plus, (2 * x).reshape(3, 4) + 1)

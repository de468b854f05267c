"""ResNet-20 and the MLP compiled for aarch64 and armv7 run under qemu-user and match torch."""

import shutil

import pytest
import torch

import lastbit
from lastbit.frontend.models import get_model
from lastbit.targets import get_target
from tests.conftest import assert_close

ARM = ("aarch64-linux-gnu", "armv7a-linux-gnueabihf")
ARM_INTEGER = (*ARM, "aarch64-dotprod-linux-gnu")  # each variant has its own integer kernels (sdot, smlal)


def _skip_without_tools(triple):
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)} (make system-deps installs them)")


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM)
@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_zoo_model_runs_under_qemu(name, triple):
    _skip_without_tools(triple)
    model, x = get_model(name, pretrained=False)
    artifact = lastbit.compile(model, triple, (x,), name=name)
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(artifact.run(x.numpy()), expected, rtol=1e-4)


@pytest.mark.qemu
@pytest.mark.slow
def test_quantized_resnet20_is_bit_identical_on_every_target():
    """The integer path (int8 activations, integer kernels, single-multiply epilogue) gives the
    same bits on x86 (in-process VM) and on aarch64 / armv7 (bundles under qemu)."""
    import numpy as np

    from lastbit import Squeeze

    triples = ("x86_64-linux-gnu", *ARM_INTEGER)
    for triple in ARM_INTEGER:
        _skip_without_tools(triple)
    model, x = get_model("resnet20", pretrained=False)
    calib = np.random.default_rng(0).standard_normal((4, *x.shape[1:])).astype("float32")
    outputs = {}
    for triple in triples:
        artifact = lastbit.compile(model, triple, (x,), name="resnet20", squeeze=Squeeze(bits=3, data=calib))
        assert all(layer.kernel != "fp32" and "(ref)" not in layer.kernel for layer in artifact.report().layers)
        outputs[triple] = artifact.run(x.numpy())
    for triple in ARM_INTEGER:
        np.testing.assert_array_equal(outputs[triple], outputs["x86_64-linux-gnu"], err_msg=triple)
    with torch.no_grad():
        assert_close(outputs["x86_64-linux-gnu"], model(x).numpy(), rtol=0.5)  # 3-bit, untrained: same ballpark


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ARM_INTEGER)
def test_dynamic_activation_scales_are_bit_identical_under_qemu(small_cnn, triple):
    """Scales computed in the graph (max|x|/127, float64 reciprocal) give the host's bits too."""
    import numpy as np

    from lastbit import Squeeze

    _skip_without_tools(triple)
    model, x = small_cnn
    host = lastbit.compile(model, "x86_64-linux-gnu", (x,), squeeze=Squeeze(bits=2)).run(x.numpy())
    np.testing.assert_array_equal(lastbit.compile(model, triple, (x,), squeeze=Squeeze(bits=2)).run(x.numpy()), host)


@pytest.mark.qemu
def test_export_after_run_reuses_the_built_bundle(small_mlp, tmp_path):
    _skip_without_tools("aarch64-linux-gnu")
    from lastbit.codegen.bundle import load_manifest, run_bundle

    model, x = small_mlp
    artifact = lastbit.compile(model, "aarch64-linux-gnu", (x,))
    first = artifact.run(x.numpy())
    out = artifact.export(tmp_path / "bundle")
    assert load_manifest(out)["files"] == load_manifest(artifact._bundle_dir)["files"]
    assert_close(run_bundle(out, [x.numpy()])[0], first, rtol=0)


@pytest.mark.qemu
def test_arm_run_leaves_no_temporary_bundle_behind(small_mlp, tmp_path, monkeypatch):
    import gc
    import tempfile

    _skip_without_tools("aarch64-linux-gnu")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # only this test's temporary folders

    def leftovers():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lastbit-bundle-"))

    model, x = small_mlp
    artifact = lastbit.compile(model, "aarch64-linux-gnu", (x,))
    first = artifact.run(x.numpy())
    assert len(leftovers()) == 1  # the bundle lives as long as the artifact (export reuses it)
    artifact.close()
    assert leftovers() == []
    assert_close(artifact.run(x.numpy()), first, rtol=0)  # rebuilt after close
    del artifact
    gc.collect()
    assert leftovers() == []


def test_missing_cross_toolchain_is_a_target_error(monkeypatch, small_mlp, tmp_path):
    model, x = small_mlp
    artifact = lastbit.compile(model, "aarch64-linux-gnu", (x,))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if "aarch64" in name else real_which(name, *a, **k))
    with pytest.raises(lastbit.TargetError, match="apt-get install"):
        artifact.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()

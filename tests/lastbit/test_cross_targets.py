"""ResNet-20 and the MLP compiled for aarch64 and armv7 run under qemu-user and match torch."""

import shutil

import pytest
import torch

import lastbit
from lastbit.frontend.models import get_model
from lastbit.targets import get_target
from tests.conftest import assert_close

ARM = ("aarch64-linux-gnu", "armv7a-linux-gnueabihf")


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
def test_export_after_run_reuses_the_built_bundle(small_mlp, tmp_path):
    _skip_without_tools("aarch64-linux-gnu")
    from lastbit.codegen.bundle import load_manifest, run_bundle

    model, x = small_mlp
    artifact = lastbit.compile(model, "aarch64-linux-gnu", (x,))
    first = artifact.run(x.numpy())
    out = artifact.export(tmp_path / "bundle")
    assert load_manifest(out)["files"] == load_manifest(artifact._bundle_dir)["files"]
    assert_close(run_bundle(out, [x.numpy()])[0], first, rtol=0)


def test_missing_cross_toolchain_is_a_target_error(monkeypatch, small_mlp, tmp_path):
    model, x = small_mlp
    artifact = lastbit.compile(model, "aarch64-linux-gnu", (x,))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if "aarch64" in name else real_which(name, *a, **k))
    with pytest.raises(lastbit.TargetError, match="apt-get install"):
        artifact.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()

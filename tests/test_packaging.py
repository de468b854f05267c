"""`pip install .` (not only -e) must give a working lastbit.<stage> layout."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install_maps_every_stage(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    probe = (
        "import lastbit, lastbit.frontend, lastbit.passes, lastbit.codegen, lastbit.targets, lastbit.autotune;"
        "import lastbit.frontend.models as m; from lastbit.frontend.models.imagenet_labels import imagenet_labels;"
        "from importlib import resources;"
        "assert lastbit.__file__.startswith(%r), lastbit.__file__;"
        "assert len(imagenet_labels()) == 1000;"
        "assert resources.files('lastbit.codegen').joinpath('runtime/lastbit_run.c').is_file();"
        "print(sorted(t.triple for t in lastbit.targets.list_targets()))"
    ) % str(target)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "aarch64-linux-gnu" in proc.stdout
    assert not (target / "passes").exists() and not (target / "frontend").exists()

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
    # Every package folder of the tree is installed (a subpackage missing from pyproject's
    # explicit list would only fail on a user's machine).
    stages = {"lastbit": "lastbit", "frontend": "lastbit/frontend", "passes": "lastbit/passes",
              "codegen": "lastbit/codegen", "targets": "lastbit/targets", "autotune": "lastbit/autotune"}
    for folder, installed in stages.items():
        for init in (REPO / folder).rglob("__init__.py"):
            package = init.parent.relative_to(REPO / folder)
            assert (target / installed / package / "__init__.py").is_file(), f"{folder}/{package} is not installed"
    assert (target / "lastbit/codegen/accel/presets.toml").is_file()

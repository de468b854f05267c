"""accel-sim end to end: quantized models on the simulated accelerator equal the x86 integer
path bit for bit, and a new hardware target is one file that nothing else references."""

import importlib.util
import sys
import textwrap

import numpy as np
import pytest

from lastbit.api import compile as lastbit_compile
from lastbit.squeeze import Squeeze
from lastbit.targets import get_target


@pytest.fixture(scope="module")
def squeeze():
    return Squeeze(bits=3, keep_first_last=False)


def _both(model, x, squeeze, target="accel-sim"):
    accel = lastbit_compile(model, target, (x,), squeeze=squeeze)
    host = lastbit_compile(model, "x86_64-linux-gnu", (x,), squeeze=squeeze)
    return accel, host


def test_small_cnn_on_accel_sim_matches_x86_integer_path_bit_exactly(small_cnn, squeeze):
    model, x = small_cnn
    accel, host = _both(model, x, squeeze)
    module = accel._compiled.accel
    assert [layer.name for layer in module.layers] == ["conv1", "conv2", "fc"]
    assert module.layers[0].fused == ("bias", "batch_norm", "relu")  # BN folded into α' and the bias
    got = accel.run(x)
    assert np.array_equal(got, host.run(x))
    module.reference = True  # the same host graph with quant_reference in place of the simulator
    assert np.array_equal(accel.run(x), got)
    module.reference = False
    torch_out = model(x).detach().numpy()
    assert np.abs(got - torch_out).max() < 0.5 * np.abs(torch_out).max()  # still the same model, roughly

    report = accel.report()
    assert report.accelerator["offloaded_layers"] == 3
    assert report.accelerator["total"]["cycles"] > 0
    assert 0 < report.accelerator["energy_ratio_vs_mac8"] < 1
    assert all(layer.kernel.startswith("accel default") for layer in report.layers)
    assert "int8-MAC array of the same size" in report.format_table()


def test_export_writes_programs_that_load_back_and_compute_the_same(small_cnn, squeeze, tmp_path):
    from lastbit.codegen.accel.export import load_programs
    from lastbit.codegen.accel.functional_sim import run_layer
    from lastbit.errors import ArtifactError

    model, x = small_cnn
    accel = lastbit_compile(model, "accel-sim-small", (x,), squeeze=squeeze)
    out = accel.export(tmp_path / "out")
    config, programs, manifest = load_programs(out)
    layers = accel._compiled.accel.layers
    assert config == layers[0].program.config and manifest["target"] == "accel-sim-small"
    rng = np.random.default_rng(0)
    for loaded, layer in zip(programs, layers, strict=True):
        assert loaded.instructions == layer.program.instructions
        x_q = rng.integers(-127, 128, (loaded.layer.batch, loaded.layer.in_channels, loaded.layer.height,
                                       loaded.layer.width)).astype(np.int8)
        assert np.array_equal(run_layer(loaded, x_q), run_layer(layer.program, x_q))
    accel.export(tmp_path / "out")  # an earlier export may be replaced …
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="notes.txt"):  # … not with files the user added to it
        accel.export(tmp_path / "out")
    assert (out / "notes.txt").read_text() == "keep"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="refusing to replace"):  # … a user's folder may not
        accel.export(tmp_path / "mine")


def test_int8_layers_run_as_digit_planes_bit_exactly(small_cnn, squeeze):
    """int8 codes are no single power of two: the shift-add array runs them as digit planes
    (input repeated per term), equal to the x86 integer path bit for bit, and they cost their
    extra passes in cycles and energy against power-of-two codes."""
    from lastbit.codegen.accel.dse import code_terms

    model, x = small_cnn
    int8 = Squeeze(codes="int8", keep_first_last=False)
    accel, host = _both(model, x, int8, target="accel-sim-small")
    module = accel._compiled.accel
    assert not module.skipped and [layer.name for layer in module.layers] == ["conv1", "conv2", "fc"]
    most = code_terms("int8", "shift-add")  # the DSE costs int8 at this many passes
    assert all(1 < layer.terms <= most for layer in module.layers)
    assert all(layer.program.layer.in_channels == layer.geometry.in_channels * layer.terms for layer in module.layers)
    got = accel.run(x)
    assert np.array_equal(got, host.run(x))
    module.reference = True
    assert np.array_equal(accel.run(x), got)
    module.reference = False
    pow2 = lastbit_compile(model, "accel-sim-small", (x,), squeeze=squeeze)
    assert all(layer.terms == 1 for layer in pow2._compiled.accel.layers)
    ours, theirs = accel.report().accelerator, pow2.report().accelerator
    assert ours["total"]["energy_pj"] > theirs["total"]["energy_pj"]
    assert ours["total"]["cycles"] > theirs["total"]["cycles"]
    assert [row["passes"] for row in ours["layers"]] == [layer.terms for layer in module.layers]


@pytest.mark.slow
def test_quantized_resnet20_matches_the_x86_integer_path():
    from lastbit.frontend.models import get_model

    model, x = get_model("resnet20", pretrained=False, progress=False)
    accel, host = _both(model, x, Squeeze(bits=3))
    assert len(accel._compiled.accel.layers) >= 18
    assert np.array_equal(accel.run(x), host.run(x))


TOY_TARGET = '''
"""A toy accelerator: a 4x8 shift-add array with tiny buffers, declared in this one file."""
from lastbit.codegen.accel import AccelConfig
from lastbit.targets.accel_sim import accelerator_target

TOY = accelerator_target("toy-accel", AccelConfig(
    name="toy", description="4x8 toy array", rows=4, cols=8, input_kib=1, weight_kib=1, acc_kib=1,
    dram_bytes_per_cycle=4, clock_mhz=50))
'''


def test_a_new_hardware_target_is_one_file(tmp_path, small_mlp):
    """Nothing in the tree names 'toy-accel': the file alone registers it and it compiles and runs."""
    path = tmp_path / "toy_accel_target.py"
    path.write_text(textwrap.dedent(TOY_TARGET))
    spec = importlib.util.spec_from_file_location("toy_accel_target", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    target = get_target("toy-accel")
    assert target.runner == "sim"
    model, x = small_mlp
    squeeze = Squeeze(bits=3, keep_first_last=False)
    toy = lastbit_compile(model, "toy-accel", (x,), squeeze=squeeze)
    host = lastbit_compile(model, "x86_64-linux-gnu", (x,), squeeze=squeeze)
    assert len(toy._compiled.accel.layers) == 2
    assert np.array_equal(toy.run(x), host.run(x))
    assert toy.report().accelerator["config"]["name"] == "toy"

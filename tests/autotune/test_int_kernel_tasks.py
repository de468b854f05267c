"""Integer kernels of quantized layers as tuning tasks: the task is the kernel's unscheduled
PrimFunc, its design space the kernel's ``tuning_space``, its default the kernel's own
``schedule``; a database record re-schedules the kernel at compile time and the integer
outputs stay bit-identical."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import lastbit
from lastbit.codegen.kernels import IntLayer, get_kernel
from lastbit.codegen.quant_lowering import INT_LAYER_ATTR, KERNEL_ATTR, int_layer_from_json, int_layer_to_json
from lastbit.squeeze import Squeeze
from lastbit.targets import get_target
from tests.conftest import SmallCNN

HOST = "x86_64-linux-gnu"
CONV_KERNEL = "int8"  # runs on any x86 CPU and samples the output-row vector width


def test_int_layer_attribute_round_trips():
    layer = IntLayer(op="conv2d", code_set="pow2-4", bits=4, data_shape=(1, 8, 14, 14), weight_shape=(16, 8, 3, 3),
                     strides=(2, 2), padding=(1, 1, 0, 0), dilation=(1, 1), groups=1, act_bits=7)
    features = frozenset({"avx2", "avx512vnni"})
    assert int_layer_from_json(int_layer_to_json(layer, features)) == (layer, features)


@pytest.fixture(scope="module")
def target():
    """The host with a tunable conv2d kernel first (the host's own strategy may pick one
    without a tuning space): a target is data, so a variant is one ``replace``."""
    host = get_target(HOST)
    return dataclasses.replace(host, kernels={**host.kernels, "conv2d": (CONV_KERNEL,)})


@pytest.fixture(scope="module")
def small_cnn_q():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32"))
    return model, x, Squeeze(bits=3)


@pytest.fixture(scope="module")
def lowered_and_tasks(small_cnn_q, target):
    from lastbit.autotune.tasks import extract_tasks
    from lastbit.pipeline import import_model, integer_lowering, lower, squeeze_passes

    model, x, squeeze = small_cnn_q
    graph = import_model(model, (x,))
    for squeeze_pass in squeeze_passes(squeeze, model, target):
        graph = squeeze_pass(graph)
    lowered = lower(graph, target, integer=integer_lowering(target, squeeze))
    return lowered, extract_tasks(lowered, target.tvm())


def _int_tasks(tasks):
    return [t for t in tasks if t.kind.startswith("int:")]


def test_kernel_tasks_are_the_unscheduled_kernels(lowered_and_tasks):
    import tvm_ffi

    lowered, tasks = lowered_and_tasks
    kernel_funcs = {gv.name_hint: f for gv, f in lowered.functions_items()
                    if f.attrs is not None and KERNEL_ATTR in f.attrs}
    int_tasks = _int_tasks(tasks)
    assert {t.name for t in int_tasks} == set(kernel_funcs)  # every integer kernel is a task
    kinds = {t.kind for t in int_tasks}
    assert f"int:{CONV_KERNEL}" in kinds and len(kinds) == 2  # the convs' kernel and the fc's
    for task in int_tasks:
        func = task.mod["main"]
        assert not bool(func.attrs.get("tirx.is_scheduled", False))
        layer, _ = int_layer_from_json(str(func.attrs[INT_LAYER_ATTR]))
        rebuilt = get_kernel(str(func.attrs[KERNEL_ATTR])).prim_func(layer)
        assert tvm_ffi.structural_equal(func.body, rebuilt.body, map_free_vars=True)
    conv_tasks = [t for t in int_tasks if t.kind == f"int:{CONV_KERNEL}"]
    assert len(conv_tasks) == 2 and all(t.tunable for t in conv_tasks)  # conv1 and conv2 differ in C_in
    # each integer task carries its layer's useful MACs (the roofline's numerator); the rest none
    from lastbit.codegen.kernels.common import layer_macs

    for task in tasks:
        func = task.mod["main"]
        expected = layer_macs(int_layer_from_json(str(func.attrs[INT_LAYER_ATTR]))[0]) if task in int_tasks else None
        assert task.macs == expected, task.name
    assert sorted(t.macs for t in conv_tasks) == [8 * 64 * 3 * 9, 8 * 64 * 8 * 9]


def test_default_candidate_is_what_the_lowering_scheduled(lowered_and_tasks, target):
    import tvm_ffi

    from lastbit.autotune.templates import default_schedule

    lowered, tasks = lowered_and_tasks
    for task in _int_tasks(tasks):
        default = default_schedule(task.mod, target.tvm()).mod["main"]
        assert tvm_ffi.structural_equal(default.body, lowered[task.name].body, map_free_vars=True), task.name


def test_kernel_design_space_samples_the_kernels_knobs(lowered_and_tasks, target):
    import tvm_ffi
    from tvm import s_tir

    from lastbit.autotune.templates import design_spaces

    _, tasks = lowered_and_tasks
    task = next(t for t in tasks if t.kind == f"int:{CONV_KERNEL}")
    seen = set()
    for seed in range(1, 12):
        (space,) = design_spaces(s_tir.Schedule(task.mod, seed=seed), target.tvm())
        assert any(str(inst.kind.name) == "SampleCategorical" for inst in space.trace.insts)
        seen.add(tvm_ffi.structural_hash(space.mod))
    assert len(seen) > 1


def _non_default_candidate(task, target):
    import tvm_ffi
    from tvm import s_tir

    from lastbit.autotune.templates import default_schedule, design_spaces

    default = default_schedule(task.mod, target.tvm())
    for seed in range(1, 50):
        (space,) = design_spaces(s_tir.Schedule(task.mod, seed=seed), target.tvm())
        if not tvm_ffi.structural_equal(space.mod, default.mod):
            return default, space
    raise AssertionError(f"{task.name}: the design space only yields the default")


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "dynamic"])
def test_db_record_reschedules_kernels_and_outputs_stay_bit_identical(tmp_path, small_cnn_q, lowered_and_tasks,
                                                                      target, calibrated):
    """A record that says a non-default candidate is faster wins at compile time (the
    kernel function changes) and the integer path's output does not change by one bit."""
    import tvm_ffi

    from lastbit.autotune.database import TuningDatabase

    model, x, _ = small_cnn_q
    calib = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype("float32") if calibrated else None
    squeeze = Squeeze(bits=3, data=calib)
    _, tasks = lowered_and_tasks
    db = TuningDatabase(tmp_path, target)
    tuned_names = []
    for task in _int_tasks(tasks):
        if not task.tunable:
            continue
        default, other = _non_default_candidate(task, target)
        db.commit(task.mod, default.trace, [1e-3])
        db.commit(task.mod, other.trace, [1e-6])
        tuned_names.append(task.name)
    assert tuned_names
    plain = lastbit.compile(model, target, (x,), squeeze=squeeze)
    tuned = lastbit.compile(model, target, (x,), squeeze=squeeze, db=tmp_path)
    for name in tuned_names:
        before, after = plain.mod[name], tuned.mod[name]
        assert not tvm_ffi.structural_equal(before.body, after.body, map_free_vars=True), name
        assert str(after.attrs[KERNEL_ATTR]) == str(before.attrs[KERNEL_ATTR])
        assert int(after.attrs["op_pattern"]) == 8 and bool(after.attrs["tirx.is_scheduled"])
    np.testing.assert_array_equal(tuned.run(x), plain.run(x))


def test_tune_then_compile_keeps_the_integer_path_bit_identical(tmp_path, small_cnn_q, target):
    """The tuner measures the kernel tasks (default first, then the kernel's template) and
    the compiled model with the database gives exactly the untuned model's output."""
    from lastbit.autotune.tuner import tune_model

    model, x, squeeze = small_cnn_q
    result = tune_model(model, target, tmp_path, trials=3, per_round=2, example_inputs=(x,), squeeze=squeeze,
                        progress=False, confirm=0, max_tasks=2)
    assert [t.kind for t in result.tasks] == [f"int:{CONV_KERNEL}"] * 2  # the convs are the heaviest tasks
    assert all(t.measured + t.reused == 3 and t.failed == 0 and t.best_ms <= t.default_ms for t in result.tasks)
    plain = lastbit.compile(model, target, (x,), squeeze=squeeze)
    tuned = lastbit.compile(model, target, (x,), squeeze=squeeze, db=tmp_path)
    np.testing.assert_array_equal(tuned.run(x), plain.run(x))

"""Task extraction and templates: one task per distinct function, the default schedule is the
pipeline's, the templates expose knobs."""

from __future__ import annotations

import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir

from lastbit.autotune.tasks import extract_tasks, workload_of
from lastbit.autotune.templates import GENERIC, default_schedule, design_spaces
from lastbit.codegen import cpu_schedule
from lastbit.pipeline import import_model, lower
from lastbit.targets import get_target

HOST = get_target("x86_64-linux-gnu")


class TwinDense(torch.nn.Module):
    """Two dense layers of one shape (one task, called twice) and a conv (another kind)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x, y):
        return self.conv(x).mean(), self.b(torch.relu(self.a(y)))


@pytest.fixture(scope="module")
def lowered_and_tasks():
    torch.manual_seed(0)
    graph = import_model(TwinDense().eval(), (torch.randn(1, 3, 8, 8), torch.randn(2, 32)))
    lowered = lower(graph, HOST)
    return lowered, extract_tasks(lowered, HOST.tvm())


def test_identical_functions_are_one_task_with_their_call_count(lowered_and_tasks):
    lowered, tasks = lowered_and_tasks
    dense = [t for t in tasks if t.kind == cpu_schedule.DENSE_PACKED]
    conv = [t for t in tasks if t.kind == cpu_schedule.CONV2D_NCHWC]
    assert len(conv) == 1 and conv[0].tunable
    # fc a (+relu) and fc b fuse differently; each distinct body is one task, weights add up
    # to the number of dense calls in main.
    calls = str(lowered["main"]).count("dense_packed")
    assert sum(t.weight for t in dense) == calls and len(dense) <= calls
    keys = [tvm_ffi.structural_hash(t.mod) for t in tasks]
    assert len(set(keys)) == len(keys)


def test_default_schedule_is_the_pipelines_default(lowered_and_tasks):
    lowered, _ = lowered_and_tasks
    info = cpu_schedule.cpu_info(HOST.tvm())
    for gv, func in lowered.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        workload = workload_of(func)
        ours = default_schedule(workload, HOST.tvm()).mod["main"]
        pipeline = cpu_schedule.schedule_prim_func(workload["main"], info, name=gv.name_hint)
        assert tvm_ffi.structural_equal(ours, pipeline.without_attr("tirx.is_scheduled")), gv.name_hint


def test_templates_sample_knobs_and_variants(lowered_and_tasks):
    _, tasks = lowered_and_tasks
    conv = next(t for t in tasks if t.kind == cpu_schedule.CONV2D_NCHWC)
    spaces = design_spaces(s_tir.Schedule(conv.mod, seed=1), HOST.tvm())
    assert len(spaces) == 2  # kernel-width loop rolled / unrolled
    assert all("sample_perfect_tile" in str(space.trace) for space in spaces)
    generic = next(t for t in tasks if t.kind == GENERIC)
    assert all("sample" not in str(s.trace) for s in design_spaces(s_tir.Schedule(generic.mod), HOST.tvm()))

"""Helpers of the autotuning tests: kernels that misbehave on purpose, a tiny model."""

from __future__ import annotations

import torch


def spin_kernel(iterations: int):
    """A PrimFunc whose run time is ``iterations`` dependent multiply-adds (a serial chain
    the compiler cannot shorten); 1 << 62 iterations never finishes: a hanging kernel."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def spin(a: T.Buffer((1,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in T.serial(T.int64(iterations)):
            with T.sblock("acc"):
                T.axis.opaque(T.int64(iterations), i)
                a[0] = a[0] * T.float32(0.999) + T.float32(1.0)

    return spin


def crash_kernel():
    """A PrimFunc that stores far outside its buffer: the process running it dies (SIGSEGV)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def crash(a: T.Buffer((1,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("poke"):
            a[T.int64(1) << T.int64(44)] = T.float32(1.0)

    return crash


def build_artifact(func, tmp_path, name: str) -> tuple[str, list]:
    """(path of the .so, args_info as JSON) of a PrimFunc, as the runner takes them."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target="llvm")
    path = tmp_path / f"{name}.so"
    lib.export_library(str(path))
    return str(path), [a.as_json() for a in ArgInfo.from_prim_func(func)]


class TinyMLP(torch.nn.Module):
    """Two dense layers: two tunable tasks that build in a second."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))



"""Tuning tasks of a compiled model: one per distinct PrimFunc of its lowered (unscheduled)
module, with the design space (our schedule templates) and the default schedule as a trace.

The workload a task tunes is exactly what the pipeline later looks up in a tuning database
(:func:`workload_of`), so ``lastbit compile --db`` finds the records ``lastbit tune`` wrote.

Integer kernels of quantized layers arrive already scheduled (``codegen/quant_lowering.py``
applies the kernel's own default), but carry the kernel's name and the IntLayer they serve
as attributes; their task is the kernel's *unscheduled* PrimFunc rebuilt from those
(:func:`int_kernel_of`), tuned over the kernel's ``tuning_space``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class TuningTask:
    """One distinct PrimFunc to tune.

    ``weight`` counts the calls of it in the model's ``main`` (a model-level latency is the
    weighted sum of task latencies); ``kind`` is the schedule template that serves it
    (``conv2d_nchwc``, ``dense_packed``, …, ``int:<kernel>`` for an integer kernel of a
    quantized layer, or ``generic``); ``tunable`` says whether the
    template has knobs (a task without sampled decisions has one candidate: the default).
    """

    name: str
    mod: "tvm.IRModule"  # noqa: F821 - IRModule({"main": workload})
    weight: int
    kind: str
    tunable: bool
    flops: float = 0.0
    macs: int | None = None  # useful MACs of one call, for an integer kernel (a roofline's numerator)


@dataclass(frozen=True)
class IntKernelRef:
    """The integer kernel behind a lowered PrimFunc: which kernel, for which layer, with the
    target features its schedule saw (``codegen/quant_lowering.INT_LAYER_ATTR``)."""

    kernel: "IntKernel"  # noqa: F821 - lastbit.codegen.kernels.IntKernel
    layer: "IntLayer"  # noqa: F821
    features: frozenset[str]
    fused: "FusedIO | None" = None  # noqa: F821 - the quantize and epilogue it does itself, if any

    @property
    def kind(self) -> str:
        return f"int:{self.kernel.name}"

    def workload(self) -> "tvm.IRModule":  # noqa: F821
        """The kernel's unscheduled PrimFunc as a tuning workload.  Not simplified: the
        kernel's schedule addresses the loops ``prim_func`` builds, and this is the function
        the lowering scheduled.  The attributes stay on it, so a workload alone says how to
        schedule it (templates.py); layers the lowering serves with one function (same
        kernel, same IntLayer) are one task."""
        import tvm

        from lastbit.codegen.quant_lowering import (
            FUSED_IO_ATTR,
            INT_LAYER_ATTR,
            KERNEL_ATTR,
            fused_io_to_json,
            int_layer_to_json,
        )

        if self.fused is None:
            func = self.kernel.prim_func(self.layer)
        else:
            func = self.kernel.fused_prim_func(self.layer, self.fused).with_attr(FUSED_IO_ATTR,
                                                                                 fused_io_to_json(self.fused))
        func = func.with_attr("global_symbol", "main").with_attr(KERNEL_ATTR, self.kernel.name)
        func = func.with_attr(INT_LAYER_ATTR, int_layer_to_json(self.layer, self.features))
        return tvm.IRModule({"main": func})


def int_kernel_of(func) -> IntKernelRef | None:
    """The integer kernel a PrimFunc (lowered, or a workload) runs, from its attributes;
    None for every other function."""
    from lastbit.codegen.quant_lowering import (
        FUSED_IO_ATTR,
        INT_LAYER_ATTR,
        KERNEL_ATTR,
        fused_io_from_json,
        int_layer_from_json,
    )

    attrs = func.attrs
    if attrs is None or KERNEL_ATTR not in attrs or INT_LAYER_ATTR not in attrs:
        return None
    from lastbit.codegen.kernels import get_kernel

    layer, features = int_layer_from_json(str(attrs[INT_LAYER_ATTR]))
    fused = fused_io_from_json(str(attrs[FUSED_IO_ATTR])) if FUSED_IO_ATTR in attrs else None
    return IntKernelRef(get_kernel(str(attrs[KERNEL_ATTR])), layer, features, fused)


def load_cpu_tensor_intrinsics() -> None:
    """Register only the CPU tensor intrinsics MetaSchedule may look up.

    ``import tvm.s_tir.tensor_intrin`` (done by ``TuneContext`` and the default builder)
    also registers CUDA/ROCm/Hexagon intrinsics and takes 25-40 s here; importing the
    package module without running its ``__init__`` and then the x86/ARM submodules takes
    about a second.  Idempotent.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm  # noqa: F401 - parent packages first

    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)  # has __path__, __init__ not executed
    sys.modules[name] = package
    import tvm.s_tir

    tvm.s_tir.tensor_intrin = package
    for sub in ("x86", "arm_cpu"):
        try:
            importlib.import_module(f"{name}.{sub}")
        except Exception as err:  # pragma: no cover - an intrinsic set missing is not fatal
            log.debug("tensor intrinsics %s not loaded: %s", sub, err)


def workload_of(func) -> "tvm.IRModule":  # noqa: F821
    """The canonical tuning workload of a lowered PrimFunc: simplified as the default
    scheduler does (so tuned and default schedules start from the same loops) and renamed
    ``main``, so two fused functions that differ only in name are one task.  An integer
    kernel's workload is its unscheduled PrimFunc (:meth:`IntKernelRef.workload`)."""
    import tvm
    from tvm import s_tir

    ref = int_kernel_of(func)
    if ref is not None:
        return ref.workload()
    func = func.with_attr("global_symbol", "main")
    mod = tvm.IRModule({"main": func})
    try:
        mod = s_tir.transform.StmtSimplify()(mod)
    except Exception as err:  # pragma: no cover - simplification is an optimization only
        log.debug("StmtSimplify failed on a workload: %s", err)
    return mod


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _call_counts(mod) -> dict[str, int]:
    """How often ``main`` calls each PrimFunc (by global name)."""
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and len(expr.args) > 0 and isinstance(expr.args[0], relax.GlobalVar):
            name = expr.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def extract_tasks(lowered_mod, target) -> list[TuningTask]:
    """One task per distinct unscheduled PrimFunc of ``lowered_mod`` (the module
    ``lower_to_tir`` returns), heaviest first (FLOPs × calls).  Integer kernels count
    although the lowering scheduled them: their task is the unscheduled kernel."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from lastbit.autotune.templates import template_kind, tuning_space

    counts = _call_counts(lowered_mod)
    tasks: dict = {}  # structural key -> TuningTask
    for gv, func in lowered_mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (_is_scheduled(func) and int_kernel_of(func) is None):
            continue
        mod = workload_of(func)
        key = tvm_ffi.structural_hash(mod)
        calls = counts.get(gv.name_hint, 1)
        for known in tasks.get(key, []):
            if tvm_ffi.structural_equal(known.mod, mod):
                known.weight += calls
                break
        else:
            kind = template_kind(mod["main"])
            try:
                flops = float(tvm.s_tir.analysis.estimate_tir_flops(mod))
            except Exception:  # pragma: no cover - FLOP estimation fails on some index math
                flops = 0.0
            task = TuningTask(name=gv.name_hint, mod=mod, weight=calls, kind=kind, tunable=False, flops=flops)
            ref = int_kernel_of(func)
            if ref is not None:
                from lastbit.codegen.kernels.common import layer_macs

                task.macs = layer_macs(ref.layer)
            tasks.setdefault(key, []).append(task)
    result = [t for group in tasks.values() for t in group]
    load_cpu_tensor_intrinsics()
    space = tuning_space(target)
    for task in list(result):
        if task.kind.startswith("int:") and not _default_applies(task, target):
            result.remove(task)  # the lowering fell back to the generic schedule: nothing to tune
            continue
        ctx = ms.TuneContext(mod=task.mod, target=target, space_generator=space, task_name=task.name,
                             rand_state=1, num_threads=1)
        try:
            designs = ctx.generate_design_space()
            task.tunable = len(designs) > 1 or any(
                str(inst.kind.name).startswith("Sample") for design in designs for inst in design.trace.insts
            )
        except Exception as err:  # the template does not apply: only the default runs
            log.warning("no design space for task %s: %s", task.name, str(err).splitlines()[0] if str(err) else err)
    result.sort(key=lambda t: -t.flops * t.weight)
    log.info("extracted %d tuning tasks (%d tunable)", len(result), sum(t.tunable for t in result))
    return result


def _default_applies(task: TuningTask, target) -> bool:
    from lastbit.autotune.templates import default_schedule

    try:
        default_schedule(task.mod, target)
        return True
    except Exception as err:  # noqa: BLE001 - the kernel's schedule refused this layer
        log.warning("integer kernel task %s (%s): its default schedule fails (%s); not tuned", task.name, task.kind,
                    str(err).strip().splitlines()[0] if str(err).strip() else err)
        return False


def lowered_module(graph, target) -> "tvm.IRModule":  # noqa: F821
    """Phase 2 of the pipeline for ``graph`` on ``target`` (a lastbit Target): the module
    whose PrimFuncs the schedule phase (and so the tuner) works on."""
    from lastbit.codegen.lowering import lower_to_tir

    tvm_target = target.tvm()
    is_cpu = str(tvm_target.kind.name) == "llvm"
    return lower_to_tir(graph, tvm_target if is_cpu else None)

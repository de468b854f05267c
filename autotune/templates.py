"""Schedule templates the tuner searches: the default CPU schedules of
``codegen/cpu_schedule.py`` with their knobs turned into MetaSchedule decisions.

Two kinds of knobs, because MetaSchedule replays a design space's *trace* with new
decisions and never re-runs the Python that built it:

* numeric knobs inside one loop structure (tile sizes, reduction unroll) are sampled
  with ``sample_perfect_tile``, afresh for each candidate (``autotune/tuner.py``);
* structural choices (unroll the kernel-width loop or not; parallelize small element-wise
  ops or not) are separate design spaces, one per choice.

The default schedule is built from the same functions with fixed knobs, so its trace can be
stored in the tuning database beside the tuned ones (``default_schedule``).

Integer kernels (workloads carrying ``lastbit.int_kernel``) bring their own template: the
kernel's ``schedule`` is the default and its ``tuning_space`` the one design space; a kernel
without a tuning space has the default as its only candidate.
"""

from __future__ import annotations

import logging
from dataclasses import replace

log = logging.getLogger(__name__)

GENERIC = "generic"
# Work (elements) above which the generic schedule parallelizes; a huge value never does.
_GENERIC_PARALLEL_THRESHOLDS = (16384, 2048, 1 << 62)


def _cpu_schedule():
    from lastbit.codegen import cpu_schedule

    return cpu_schedule


def template_kind(func) -> str:
    """The template serving a PrimFunc: the ``schedule_rule`` of our packed kernels
    (``lastbit.conv2d_nchwc``, …), ``int:<kernel>`` for an integer kernel, or ``generic``."""
    from lastbit.autotune.tasks import int_kernel_of

    ref = int_kernel_of(func)
    if ref is not None:
        return ref.kind
    cs = _cpu_schedule()
    kind = cs._kernel_kind(func)
    return kind if kind in cs._KERNEL_SCHEDULES else GENERIC


def _apply_kernel(sch, kind: str, info, sample: bool, unroll_kw: bool = False) -> None:
    cs = _cpu_schedule()
    block = cs._annotated_block(sch, kind)
    schedule = cs._KERNEL_SCHEDULES[kind]
    if schedule is cs.schedule_conv2d_nchwc:
        knobs = None
        if unroll_kw:
            loops = sch.get_loops(block)
            default = cs.default_conv_knobs(cs._extent(sch, loops[3]), cs._extent(sch, loops[4]), info)
            knobs = replace(default, unroll_kw=True)
        schedule(sch, block, info, knobs=knobs, sample=sample)
    else:
        schedule(sch, block, info, sample=sample)


def default_schedule(mod, target) -> "tvm.s_tir.Schedule":  # noqa: F821
    """The schedule the pipeline applies without a database, as a traced Schedule of the
    workload ``mod`` (kernel schedule, else the generic one, else none — as
    ``schedule_prim_func`` falls back)."""
    from tvm import s_tir

    from lastbit.autotune.tasks import int_kernel_of

    ref = int_kernel_of(mod["main"])
    if ref is not None:  # as quant_lowering schedules it; raises when the kernel refuses the layer
        sch = s_tir.Schedule(mod)
        ref.kernel.schedule(sch, ref.layer, ref.features)
        return sch
    cs = _cpu_schedule()
    info = cs.cpu_info(target)
    kind = template_kind(mod["main"])
    if kind != GENERIC:
        sch = s_tir.Schedule(mod)
        try:
            _apply_kernel(sch, kind, info, sample=False)
            return sch
        except Exception as err:
            log.debug("default %s schedule failed, using the generic one: %s", kind, err)
    sch = s_tir.Schedule(mod)
    try:
        cs.schedule_generic(sch, info)
    except Exception as err:  # pragma: no cover - schedule_generic catches per block
        log.debug("generic schedule failed: %s", err)
        sch = s_tir.Schedule(mod)
    return sch


def design_spaces(sch, target) -> list:
    """All design spaces of the workload in ``sch`` (the ``ScheduleFn`` body)."""
    from lastbit.autotune.tasks import int_kernel_of

    ref = int_kernel_of(sch.mod["main"])
    if ref is not None:
        space = sch.copy()
        if ref.kernel.tuning_space is None:
            ref.kernel.schedule(space, ref.layer, ref.features)
        else:
            ref.kernel.tuning_space(ref.layer, ref.features)(space)
        return [space]
    cs = _cpu_schedule()
    info = cs.cpu_info(target)
    kind = template_kind(sch.mod["main"])
    spaces = []
    if kind != GENERIC:
        variants = [False, True] if kind == cs.CONV2D_NCHWC else [False]
        for unroll_kw in variants:
            space = sch.copy()
            try:
                _apply_kernel(space, kind, info, sample=True, unroll_kw=unroll_kw)
                spaces.append(space)
            except Exception as err:
                log.debug("template %s (unroll_kw=%s) does not apply: %s", kind, unroll_kw, err)
        if spaces:
            return spaces
    for threshold in _GENERIC_PARALLEL_THRESHOLDS:
        space = sch.copy()
        cs.schedule_generic(space, info, cs.GenericKnobs(vector_lanes=info.lanes, min_parallel_elems=threshold))
        spaces.append(space)
    return _distinct(spaces)


def _distinct(spaces: list) -> list:
    """Drop design spaces whose loops are identical (a threshold that changes nothing)."""
    import tvm_ffi

    kept = []
    for space in spaces:
        if not any(tvm_ffi.structural_equal(space.mod, other.mod) for other in kept):
            kept.append(space)
    return kept


def register_intrinsics(mod) -> None:
    """Make the tensor intrinsics an integer kernel's schedule uses known to this process, so
    stored traces that ``tensorize`` with them replay (each kernel registers its intrinsics
    the first time its schedule runs)."""
    from lastbit.autotune.tasks import int_kernel_of

    ref = int_kernel_of(mod["main"])
    if ref is None:
        return
    try:
        default_schedule(mod, None)
    except Exception as err:  # noqa: BLE001 - the records will not replay; the caller skips them
        log.debug("default schedule of %s failed: %s", ref.kind, err)


def tuning_space(target):
    """A MetaSchedule ``ScheduleFn`` over :func:`design_spaces`, with no post-processors
    (our templates emit final loops).  The tuner samples it afresh for every candidate and
    never mutates traces, so the tile-size mutator listed here goes unused."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.ScheduleFn(
        lambda sch: design_spaces(sch, target),
        sch_rules=[],
        postprocs=[],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0},
    )

"""lastbit's compiler, phase by phase.  This file is the table of contents: every stage a
model goes through, in order, with an optional IR dump after each (``--dump-ir DIR``).

    Phase 0. Import       torch.export / ONNX  -> Graph (Relax IRModule + named params)
    Phase 1. Squeeze      graph rewrites that shrink the model (quantize, prune, low-rank)
    Phase 2. Lower        bind weights, legalize operators to TensorIR, fuse
    Phase 3. Schedule     TensorIR schedules per target (hand defaults or a tuning DB)
    Phase 4. Build        host: TVM VM executable; any target: a runtime-free bundle
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lastbit.errors import LastbitError, ModelFormatError
from lastbit.graph import Graph
from lastbit.targets import Target, get_target

log = logging.getLogger(__name__)


@dataclass
class Compiled:
    """The result of the pipeline: the squeezed graph and its scheduled TensorIR module."""

    graph: Graph
    target: Target
    mod: "tvm.IRModule"  # noqa: F821
    torch_module: object = None  # the fine-tuned torch module when squeezing trained one (ADMM)


# Phase 0. Import ---------------------------------------------------------------------------
def import_model(model, example_inputs: Sequence | None = None, name: str | None = None) -> Graph:
    """Turn a torch module, an ONNX file/proto, a torch.export .pt2 file or a Graph into a Graph."""
    from lastbit.frontend import from_exported_program, from_onnx, from_torch, load_exported_program

    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return from_onnx(path, name=name or path.stem)
        if suffix in (".pt2", ".pt"):
            return from_exported_program(load_exported_program(path), name=name or path.stem)
        raise ModelFormatError(f"{path}: unknown model file type '{suffix}' (expected .onnx or .pt2)")
    if type(model).__name__ == "ModelProto":
        return from_onnx(model, name=name)
    import torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise LastbitError(f"compiling a torch module ({type(model).__name__}) needs example_inputs")
        return from_torch(model, example_inputs, name=name)
    if isinstance(model, torch.export.ExportedProgram):
        return from_exported_program(model, name=name or "exported")
    raise ModelFormatError(f"cannot compile an object of type {type(model).__name__}")


# Phase 1. Squeeze --------------------------------------------------------------------------
def squeeze_passes(squeeze=None, torch_module=None) -> list:
    """Graph -> Graph rewrites applied in this fixed order (prune -> low-rank -> sparsity -> quantize).

    Empty for the fp32 path (``squeeze`` None). Quantization is ADMM fine-tuning of the
    torch module (when ``squeeze`` resolves to mode "admm") followed by the power-of-two
    rewrite, which then recovers the fine-tuned codes exactly.
    """
    passes: list = []
    if squeeze is None:
        return passes
    if squeeze.quantizes:
        from lastbit.passes.quantize_pow2 import QuantizePow2
        from lastbit.passes.squeeze import AdmmFinetune

        if squeeze.resolved_mode(torch_module is not None) == "admm":
            passes.append(AdmmFinetune(squeeze, torch_module))
        passes.append(QuantizePow2(squeeze))
    return passes


# Phases 2-3. Lower and schedule -----------------------------------------------------------
def lower_and_schedule(graph: Graph, target: Target, dump_ir: Path | None = None):
    """Bind weights, pack them for the target's vector width, legalize, fuse, then schedule."""
    from lastbit.codegen.cpu_schedule import schedule_for_cpu
    from lastbit.codegen.lowering import lower_to_tir

    tvm_target = target.tvm()
    is_cpu = str(tvm_target.kind.name) == "llvm"
    mod = lower_to_tir(graph, tvm_target if is_cpu else None)
    _dump(dump_ir, "2-lowered", mod)
    if is_cpu:
        mod = schedule_for_cpu(mod, tvm_target)
    _dump(dump_ir, "3-scheduled", mod)
    return mod


def compile_graph(
    graph: Graph, target: "str | Target", dump_ir: "str | Path | None" = None, squeeze=None, torch_module=None
) -> Compiled:
    """Run phases 1-3; phase 4 (build) happens lazily in the Artifact, per use.

    ``squeeze`` (a ``lastbit.Squeeze``) selects the phase-1 passes; ``torch_module`` is the
    module the graph came from, needed only for data-dependent (ADMM) squeezing.
    """
    target = get_target(target)
    dump_ir = Path(dump_ir) if dump_ir else None
    _dump(dump_ir, "0-imported", graph.mod)
    passes = squeeze_passes(squeeze, torch_module)
    for squeeze_pass in passes:
        graph = squeeze_pass(graph)
    _dump(dump_ir, "1-squeezed", graph.mod)
    tuned = next((p.result.module for p in passes if getattr(p, "result", None) is not None), None)
    mod = lower_and_schedule(graph, target, dump_ir)
    return Compiled(graph=graph, target=target, mod=mod, torch_module=tuned)


# Phase 4. Build ----------------------------------------------------------------------------
def build_vm(mod, target: Target):
    """The host path: a TVM Relax VM executable, run in-process."""
    import tvm

    return tvm.compile(mod, target.tvm())


def build_bundle(mod, target: Target, out_dir: Path, name: str, extra_manifest: dict | None = None) -> Path:
    """Any target: kernels.so + plan + params + a tiny C runner, no TVM runtime needed."""
    from lastbit.codegen.bundle import build_bundle as _build

    return _build(mod, target, out_dir, name=name, extra_manifest=extra_manifest)


def _dump(dump_dir: Path | None, phase: str, mod) -> None:
    if dump_dir is None:
        return
    from lastbit.fileio import atomic_write_text

    path = atomic_write_text(dump_dir / f"{phase}.py", mod.script(show_meta=False))
    log.info("IR after %s written to %s", phase, path)

"""lastbit's compiler, phase by phase.  This file is the table of contents: every stage a
model goes through, in order, with an optional IR dump after each (``--dump-ir DIR``).

    Phase 0. Import       torch.export / ONNX  -> Graph (Relax IRModule + named params)
    Phase 1. Squeeze      graph rewrites that shrink the model (prune, low-rank, sparsity,
                          quantize)
    Phase 2. Lower        accelerator targets: quantized layers -> the simulated array
                          (codegen/accel); quantized layers -> integer kernels picked per
                          target; bind weights, legalize operators to TensorIR, fuse
    Phase 3. Schedule     TensorIR schedules per target (hand defaults or a tuning DB)
    Phase 4. Build        host: TVM VM executable; any target: a runtime-free bundle
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
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
    kernels: dict = field(default_factory=dict)  # layer var -> KernelChoice (codegen/quant_lowering.py)
    accel: object = None  # runner "sim" targets: the accelerator side (codegen/accel/offload.py AccelModule)
    phase_s: dict = field(default_factory=dict)  # wall seconds per phase ("squeeze", "lower+schedule")


# Phase 0. Import ---------------------------------------------------------------------------
def import_model(model, example_inputs: Sequence | None = None, name: str | None = None,
                 trust_pickle: bool = False) -> Graph:
    """Turn a torch module, an ONNX file/proto, a torch.export .pt2 file or a Graph into a Graph.

    A .pt2 file is unpickled when loaded (it can run code): only with ``trust_pickle=True``."""
    from lastbit.frontend import from_exported_program, from_onnx, from_torch, load_exported_program

    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return from_onnx(path, name=name or path.stem)
        if suffix in (".pt2", ".pt"):
            return from_exported_program(load_exported_program(path, trust_pickle), name=name or path.stem)
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
def squeeze_passes(squeeze=None, torch_module=None, target: Target | None = None) -> list:
    """Graph -> Graph rewrites applied in this fixed order (prune -> low-rank -> sparsity -> quantize).

    Empty for the fp32 path (``squeeze`` None). Channel pruning removes channels for real
    (``passes/prune_channels.py``), low-rank splits layers in two (``passes/lowrank.py``),
    sparsity zeroes small weights (``passes/sparsity.py``). Quantization is ADMM (or STE)
    fine-tuning of the torch module (when ``squeeze`` resolves to mode "admm" or "ste") followed
    by the power-of-two rewrite, which then recovers the fine-tuned codes exactly. Pruned channel
    counts and low-rank ranks are multiples of ``target``'s SIMD width in floats (8 without one).
    """
    passes: list = []
    if squeeze is None:
        return passes
    if squeeze.layers is not None:  # per-layer choices: an unknown layer name fails before any pass
        from lastbit.layer_config import CheckLayerConfig

        passes.append(CheckLayerConfig(squeeze.layers))
    if squeeze.prune_target is not None:
        from lastbit.passes.prune_channels import PruneChannels

        passes.append(PruneChannels(squeeze.prune_target, squeeze.prune_criterion, torch_module=torch_module,
                                    data=squeeze.data, batch_size=squeeze.batch_size,
                                    finetune_epochs=squeeze.prune_epochs, lr=squeeze.lr,
                                    round_to=_channel_multiple(target)))
    if squeeze.rank_target is not None:
        from lastbit.passes.lowrank import parse_rank

        low_rank = parse_rank(squeeze.rank_target)
        low_rank.round_to = _channel_multiple(target)
        passes.append(low_rank)
    if squeeze.sparsity:
        from lastbit.passes.sparsity import Sparsify

        passes.append(Sparsify(squeeze.sparsity, torch_module=torch_module, data=squeeze.data,
                               batch_size=squeeze.batch_size))
    if squeeze.quantizes:
        from lastbit.passes.quantize_pow2 import QuantizePow2
        from lastbit.passes.squeeze import AdmmFinetune

        state = None
        if squeeze.resolved_mode(torch_module is not None) != "data-free":  # ADMM or STE training
            passes.append(AdmmFinetune(squeeze, torch_module))
        elif squeeze.datafree is not None:
            from lastbit.passes.datafree import DataFreeQuantize, DataFreeState

            state = DataFreeState()
            passes.append(DataFreeQuantize(squeeze, torch_module, state))
        passes.append(QuantizePow2(squeeze, datafree_state=state))
    return passes


def _channel_multiple(target: Target | None) -> int:
    """The CPU kernels block channels by the largest power of two ≤ the SIMD width dividing
    the count, so structural passes keep counts at multiples of the width in floats."""
    if target is None or str(target.tvm().kind.name) != "llvm":
        return 8
    from lastbit.codegen.cpu_schedule import cpu_info

    return cpu_info(target.tvm()).lanes


# Phases 2-3. Lower and schedule -----------------------------------------------------------
def integer_lowering(target: Target, squeeze=None):
    """Phase 2a for quantized graphs on CPU targets: the pass that turns each quantized layer
    into int8 activations × an integer kernel from the target's strategy (None: float
    reference decode, i.e. no Squeeze or ``Squeeze(integer_kernels=False)``)."""
    if squeeze is None or not squeeze.quantizes or not getattr(squeeze, "integer_kernels", True):
        return None
    if str(target.tvm().kind.name) != "llvm":
        return None
    from lastbit.codegen.quant_lowering import LowerQuantizedLayers

    return LowerQuantizedLayers(target)


def lower(graph: Graph, target: Target, dump_ir: Path | None = None, integer=None):
    """Phase 2: swap quantized layers for integer kernels (``integer``, from
    :func:`integer_lowering`), bind weights, pack them for the target's vector width,
    legalize, fuse.  The tuner extracts its tasks from this module."""
    from lastbit.codegen.lowering import lower_to_tir

    tvm_target = target.tvm()
    is_cpu = str(tvm_target.kind.name) == "llvm"
    if integer is not None:
        graph = integer(graph)
        _dump(dump_ir, "2a-integer", graph.mod)
    mod = lower_to_tir(graph, tvm_target if is_cpu else None)
    _dump(dump_ir, "2-lowered", mod)
    return mod


def lower_and_schedule(graph: Graph, target: Target, dump_ir: Path | None = None, integer=None, db=None):
    """Phases 2-3: :func:`lower`, then schedule: the best record of the tuning database
    ``db`` (a ``lastbit tune`` folder) for each function it has, hand defaults for the rest."""
    from lastbit.codegen.cpu_schedule import schedule_for_cpu

    mod = lower(graph, target, dump_ir, integer=integer)
    tvm_target = target.tvm()
    if str(tvm_target.kind.name) == "llvm":
        if db is not None:
            from lastbit.autotune.database import apply_database

            mod = apply_database(mod, db, target)
        mod = schedule_for_cpu(mod, tvm_target)
    _dump(dump_ir, "3-scheduled", mod)
    return mod


def offload(graph: Graph, target: Target, dump_ir: Path | None = None, db=None):
    """Phase 2a' for accelerator targets (runner "sim"): quantized layers go to the simulated
    shift-add array (codegen/accel), the rest stays for the host; (host graph, AccelModule).
    ``db``: a ``lastbit tune`` folder whose tuned tilings replace the estimate's choice."""
    if target.runner != "sim":
        return graph, None
    from lastbit.codegen.accel import config_for_target
    from lastbit.codegen.accel.offload import offload_to_accelerator

    from lastbit.autotune.accel_tuning import load_tilings

    host_graph, accel = offload_to_accelerator(graph, config_for_target(target.triple), load_tilings(db, target))
    _dump(dump_ir, "2a-offloaded", host_graph.mod)
    return host_graph, accel


def compile_graph(
    graph: Graph, target: "str | Target", dump_ir: "str | Path | None" = None, squeeze=None, torch_module=None,
    db: "str | Path | None" = None,
) -> Compiled:
    """Run phases 1-3; phase 4 (build) happens lazily in the Artifact, per use.

    ``squeeze`` (a ``lastbit.Squeeze``) selects the phase-1 passes; ``torch_module`` is the
    module the graph came from, needed only for data-dependent (ADMM) squeezing; ``db`` is
    a tuning database folder (``lastbit tune``) whose best records replace default schedules.
    """
    target = get_target(target)
    dump_ir = Path(dump_ir) if dump_ir else None
    _dump(dump_ir, "0-imported", graph.mod)
    start = time.perf_counter()
    passes = squeeze_passes(squeeze, torch_module, target)
    for squeeze_pass in passes:
        graph = squeeze_pass(graph)
    _dump(dump_ir, "1-squeezed", graph.mod)
    tuned = next((p.result.module for p in passes if getattr(p, "result", None) is not None), None)
    squeezed = time.perf_counter()
    host_graph, accel = offload(graph, target, dump_ir, db=db)
    integer = integer_lowering(target, squeeze)
    mod = lower_and_schedule(host_graph, target, dump_ir, integer=integer, db=db)
    kernels = dict(integer.choices) if integer is not None else {}
    phase_s = {"squeeze": squeezed - start, "lower+schedule": time.perf_counter() - squeezed}
    log.info("compiled %s: %s", graph.name, ", ".join(f"{k} {v:.1f} s" for k, v in phase_s.items()))
    return Compiled(graph=graph, target=target, mod=mod, torch_module=tuned, kernels=kernels, accel=accel,
                    phase_s=phase_s)


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

"""Lower a Graph to the form every backend starts from: parameters bound as constants,
operators legalized to TensorIR and fused, ``main`` a flat dataflow of ``call_tir`` calls."""

from __future__ import annotations

from lastbit.graph import Graph


def lower_to_tir(graph: Graph, target=None):
    """Return an IRModule whose ``main`` takes only the model inputs and calls fused PrimFuncs.

    With a CPU ``target`` (a tvm Target), convolutions and dense layers are first rewritten
    into pre-packed blocked layouts for that target's vector width (``prepare_for_cpu``);
    it needs the weights bound as constants, so it runs after binding.  Constant folding
    runs after legalization, so weight-only work happens once at compile time.
    """
    import tvm
    from tvm import relax

    mod = graph.bound_module()
    if target is not None:
        from lastbit.codegen.cpu_schedule import prepare_for_cpu

        mod = prepare_for_cpu(mod, target)
    seq = tvm.ir.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ],
        name="lastbit.lower_to_tir",
    )
    return seq(mod)

"""Lower a Graph to the form every backend starts from: parameters bound as constants,
operators legalized to TensorIR and fused, ``main`` a flat dataflow of ``call_tir`` calls."""

from __future__ import annotations

from lastbit.graph import Graph


def lower_to_tir(graph: Graph):
    """Return an IRModule whose ``main`` takes only the model inputs and calls fused PrimFuncs.

    Constant folding runs after legalization, so weight-only work (transposes, reshapes of
    biases) happens once at compile time instead of on every call.
    """
    import tvm
    from tvm import relax

    mod = graph.bound_module()
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

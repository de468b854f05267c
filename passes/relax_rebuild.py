"""Re-emit ``main`` binding by binding with new parameters, so every shape is re-inferred.

Structural passes (channel pruning, low-rank splitting) change parameter shapes; rebuilding
the function through a BlockBuilder lets Relax infer each binding's new shape instead of
patching annotations by hand. A pass supplies a hook that may replace a binding's value (or
emit several bindings in its place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lastbit.errors import UnsupportedOpError
from lastbit.graph import Graph

__all__ = ["SKIP", "Rebuilder", "rebuild_main"]

SKIP = object()  # a hook's answer for a binding to drop (a view of a parameter that is gone)


class Rebuilder:
    """State handed to the hook: the BlockBuilder and the old-expression -> new-expression map."""

    def __init__(self, bb, env: dict, consts: list[tuple[Any, Any]], params: dict[str, Any]):
        self.bb = bb
        self.env = env
        self.consts = consts
        self.params = params  # parameter name -> its Var in the rebuilt function

    def remap(self, expr):
        """``expr`` (an expression of the old function) in terms of the new one."""
        import tvm
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise KeyError(f"variable '{expr.name}' has no value in the rebuilt function")
            return self.env[expr]
        if isinstance(expr, tvm.ir.expr.Constant):
            for old, new in self.consts:
                if old.same_as(expr):
                    return new
            return expr
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.remap(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.remap(expr.tuple_value), int(expr.index))
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [self.remap(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr  # ShapeExpr, PrimValue, StringImm: no variables inside


Hook = Callable[[Rebuilder, Any, Any], Any]


def rebuild_main(graph: Graph, params: dict[str, np.ndarray], hook: Hook | None = None,
                 consts: list[tuple[Any, Any]] | None = None, source_names: dict[str, str] | None = None) -> Graph:
    """``graph`` with parameters ``params`` (same names keep their Vars' role; shapes may differ;
    names absent are dropped, new names appended) and ``main`` re-emitted.

    ``hook(rebuilder, var, value)`` sees each binding of the old function; it returns a new
    value expression to bind to ``var`` (already remapped), or None to keep the remapped
    original, or ``SKIP`` to drop the binding. ``consts`` replaces Relax constants (old, new)."""
    import tvm
    from tvm import relax

    main = graph.mod["main"]
    n_in = len(graph.inputs)
    old_param = {name: var for var, name in graph.param_vars().items()}
    new_vars = []
    by_name: dict[str, Any] = {}
    env: dict = {}
    for var in main.params[:n_in]:
        env[var] = var
    for name, value in params.items():
        new = relax.Var(name, relax.TensorType(tuple(int(s) for s in value.shape), str(value.dtype)))
        new_vars.append(new)
        by_name[name] = new
        if name in old_param:
            env[old_param[name]] = new
    bb = relax.BlockBuilder()
    rb = Rebuilder(bb, env, consts or [], by_name)
    with bb.function("main", list(main.params[:n_in]) + new_vars, attrs=dict(main.attrs) if main.attrs else None,
                     pure=main.is_pure):
        for block in main.body.blocks:
            dataflow = isinstance(block, relax.DataflowBlock)
            if dataflow:
                with bb.dataflow():
                    _emit_block(rb, block, hook)
            else:
                _emit_block(rb, block, hook)
        bb.emit_func_output(rb.remap(main.body.body))
    new_mod = bb.get()
    functions = {gv: f for gv, f in graph.mod.functions_items()}
    functions[graph.mod.get_global_var("main")] = new_mod["main"]
    mod = tvm.IRModule(functions, attrs=graph.mod.attrs)
    relax.analysis.well_formed(mod)
    if source_names is None:
        source_names = {k: v for k, v in graph.source_names.items() if k in params}
    return graph.replace(mod=mod, params=dict(params), source_names=source_names)


def _emit_block(rb: Rebuilder, block, hook: Hook | None) -> None:
    """Emit a block's bindings; a dataflow block's non-dataflow vars become its outputs."""
    from tvm import relax

    for binding in block.bindings:
        if not isinstance(binding, relax.VarBinding):
            raise UnsupportedOpError("relax.match_cast", binding.var.name,
                                     "a structural squeeze cannot re-infer shapes through it")
        var = binding.var
        value = hook(rb, var, binding.value) if hook else None
        if value is SKIP:
            continue
        if value is None:
            value = rb.remap(binding.value)
        if isinstance(block, relax.DataflowBlock) and not isinstance(var, relax.DataflowVar):
            rb.env[var] = rb.bb.emit_output(value, name_hint=var.name)
        elif isinstance(value, relax.Var):
            rb.env[var] = value
        else:
            rb.env[var] = rb.bb.emit(value, name_hint=var.name)

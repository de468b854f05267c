"""Import a torch module (or a saved torch.export program) into a lastbit Graph."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from lastbit.errors import ModelFormatError, UnsupportedOpError
from lastbit.graph import Graph, TensorSpec

log = logging.getLogger(__name__)


def from_torch(module, example_inputs: Sequence, name: str | None = None) -> Graph:
    """Export ``module`` with ``torch.export`` and translate it with TVM's Relax torch frontend.

    The module is put in eval mode for the export and restored afterwards.  Parameters stay
    as inputs of ``main`` so passes can rewrite them; their torch names are kept.
    """
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(x) for x in example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, example_inputs)
    finally:
        module.train(was_training)
    return from_exported_program(program, name=name or type(module).__name__)


def load_exported_program(path: "str | Path"):
    """Load a ``torch.export.save`` file (.pt2); weights only, no pickle of arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    try:
        return torch.export.load(str(path))
    except Exception as err:  # torch raises several unrelated types for a bad archive
        raise ModelFormatError(f"{path}: not a readable torch.export (.pt2) archive: {err}") from err


def from_exported_program(program, name: str = "model") -> Graph:
    """Translate a ``torch.export.ExportedProgram`` into a Graph."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program as relax_from_ep

    try:
        mod = relax_from_ep(program, keep_params_as_input=True)
    except AssertionError as err:
        # The Relax frontend reports an unknown aten op as an assertion naming it.
        msg = str(err)
        op = msg.split("'")[1] if msg.count("'") >= 2 else msg
        node = _node_for_target(program, op)
        raise UnsupportedOpError(op, node, "no Relax translation in TVM's torch frontend") from err
    mod, detached = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    param_vars = main.params[num_input:]
    values = detached.get("main", [])
    if len(values) != len(param_vars):
        raise ModelFormatError(f"{name}: parameter count mismatch after import")

    sig = program.graph_signature
    torch_name = {spec.arg.name: spec.target for spec in sig.input_specs if spec.target is not None}
    params: dict[str, np.ndarray] = {}
    source_names: dict[str, str] = {}
    for var, value in zip(param_vars, values):
        params[var.name] = value.numpy()
        source_names[var.name] = torch_name.get(var.name, var.name)
    inputs = [
        TensorSpec(v.name, tuple(int(d) for d in v.ty.shape), str(v.ty.dtype))
        for v in main.params[:num_input]
    ]
    return Graph(mod=mod, params=params, inputs=inputs, source_names=source_names, source="torch", name=name)


def _node_for_target(program, op: str) -> str:
    for node in program.graph.nodes:
        if node.op == "call_function" and op in str(node.target):
            return node.name
    return ""

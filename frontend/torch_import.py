"""Import a torch module (or a saved torch.export program) into a lastbit Graph."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from lastbit.errors import ModelFormatError, UnsupportedOpError, UntrustedModelError
from lastbit.frontend.node_errors import tensor_label
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


def load_exported_program(path: "str | Path", trust_pickle: bool = False):
    """Load a ``torch.export.save`` file (.pt2) with ``torch.export.load``.

    That loader unpickles parts of the archive (it falls back to ``torch.load(weights_only=
    False)`` and ``pickle.loads``), so a crafted .pt2 can run code when it is opened.  It is
    refused unless ``trust_pickle=True`` (CLI: ``--trust-pickle``) says the file is trusted;
    an ONNX export carries no code and needs no such flag.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    if not trust_pickle:
        raise UntrustedModelError(
            f"{path}: refusing to load a torch.export archive: torch.export.load unpickles it, which can run "
            f"code from the file; pass trust_pickle=True (CLI: --trust-pickle) only for a file you trust, "
            f"or export the model to ONNX")
    try:
        return torch.export.load(str(path))
    except Exception as err:  # torch raises several unrelated types for a bad archive
        raise ModelFormatError(f"{path}: not a readable torch.export (.pt2) archive: {err}") from err


def from_exported_program(program, name: str = "model") -> Graph:
    """Translate a ``torch.export.ExportedProgram`` into a Graph."""
    from tvm import relax

    try:
        mod = _translate(program, name)
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


def _translate(program, name: str):
    """TVM's torch frontend (``from_exported_program(keep_params_as_input=True)``), with an
    error in any node's converter reported as NodeImportError naming the node."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from lastbit.errors import LastbitError, NodeImportError
    from lastbit.frontend.node_errors import close_block_builder, node_import_error, tvm_error_summary

    def naming_failures(convert):
        def convert_node(node, *rest):
            try:
                return convert(node, *rest)
            except LastbitError:
                raise
            except Exception as err:  # noqa: BLE001 - any TVM failure becomes one line naming the node
                raise node_import_error(str(node.target), node.name, _describe_args(node), err) from err
        return convert_node

    class NodeNamingImporter(ExportedProgramImporter):
        def create_convert_map(self):
            return {op: naming_failures(convert) for op, convert in super().create_convert_map().items()}

    # What TVM's from_exported_program does first (lastbit models have no sparse tensors).
    program = program.run_decompositions()
    importer = NodeNamingImporter()
    try:
        return importer.from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=False,
                                              no_bind_return_tuple=False, custom_convert_map=None)
    except NodeImportError:
        close_block_builder(importer.block_builder)  # raised inside the function being built
        raise
    except Exception as err:  # noqa: BLE001
        if isinstance(err, (LastbitError, AssertionError)):
            raise
        raise ModelFormatError(f"{name}: TVM's torch frontend failed: {tvm_error_summary(err)}") from err


def _describe_args(node) -> list[str]:
    """``name dtype[shape]`` of each tensor argument of an FX node (from export's fake values)."""
    described = []
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if hasattr(val, "shape") and hasattr(val, "dtype"):
            described.append(tensor_label(arg.name, str(val.dtype).removeprefix("torch."), list(val.shape)))
        else:
            described.append(arg.name)
    return described


def _node_for_target(program, op: str) -> str:
    for node in program.graph.nodes:
        if node.op == "call_function" and op in str(node.target):
            return node.name
    return ""

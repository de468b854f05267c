"""Import an ONNX model (file path or ModelProto) into a lastbit Graph."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lastbit.errors import LastbitError, ModelFormatError, NodeImportError, UnsupportedOpError
from lastbit.graph import Graph, TensorSpec

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def load_onnx(model, check: bool = True) -> "onnx.ModelProto":  # noqa: F821
    """Read and validate an ONNX model; a missing, truncated or malformed file raises ModelFormatError."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto, where = model, "<ModelProto>"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise ModelFormatError(f"{where}: no such ONNX file")
        try:
            proto = onnx.load(str(path))
        except Exception as err:  # protobuf DecodeError and friends
            raise ModelFormatError(f"{where}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    if not proto.graph.node:
        raise ModelFormatError(f"{where}: the ONNX graph has no nodes")
    if check:
        _check_model(proto, where)
    return proto


def _check_model(proto, where: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ModelFormatError(f"{where}: malformed ONNX model: {str(err).splitlines()[0]}") from err


def from_onnx(model, name: str | None = None, initializer_inputs: "Sequence[str]" = ()) -> Graph:
    """Translate an ONNX model with TVM's Relax ONNX frontend; initializers become named parameters.

    Old exports (IR 3, opset 7-9) also list every initializer in ``graph.input``: such an
    initializer is a constant weight unless named in ``initializer_inputs``, which makes it a
    model input instead.  Parameters are bound to initializers by name, never by position.
    Non-float initializers (int64 shapes for Reshape/ConstantOfShape, indices) are folded in
    as constants rather than becoming parameters.  A node TVM cannot translate raises
    NodeImportError naming it.
    """
    from onnx import numpy_helper

    # Unknown ops first: the checker would reject them with a less useful message.
    proto = load_onnx(model, check=False)
    where = str(model) if not hasattr(model, "graph") else "<ModelProto>"
    name = name or (Path(model).stem if not hasattr(model, "graph") else (proto.graph.name or "onnx_model"))
    supported = _onnx_converters()
    for node in proto.graph.node:
        if node.op_type not in supported and node.op_type not in ("Constant", "If"):
            raise UnsupportedOpError(node.op_type, node.name or node.output[0], "no Relax translation in TVM's ONNX frontend")
    _check_model(proto, where)

    proto = _constants_and_inputs_apart(proto, set(initializer_inputs), name)
    shape_dict, dtype_dict = {}, {}
    for inp in proto.graph.input:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            raise ModelFormatError(f"{name}: input '{inp.name}' has a dynamic shape {dims}; export with fixed shapes")
        shape_dict[inp.name] = dims
        dtype_dict[inp.name] = _ONNX_DTYPES.get(tt.elem_type, "float32")

    mod = _translate(proto, shape_dict, dtype_dict, name)
    main = mod["main"]
    num_input = len(shape_dict)
    if "num_input" in main.attrs and int(main.attrs["num_input"]) != num_input:
        raise ModelFormatError(f"{name}: TVM's ONNX frontend took {int(main.attrs['num_input'])} inputs, "
                               f"expected {num_input} ({', '.join(shape_dict)})")
    # The frontend names a parameter after its initializer, less torch's "onnx::" prefix.
    by_var_name = {init.name.removeprefix("onnx::"): init for init in proto.graph.initializer}
    params: dict[str, np.ndarray] = {}
    source_names: dict[str, str] = {}
    for var in main.params[num_input:]:
        init = by_var_name.get(var.name)
        if init is None or var.name in params:
            raise ModelFormatError(f"{name}: parameter '{var.name}' matches no initializer (or two)")
        value = numpy_helper.to_array(init)
        expected = tuple(int(d) for d in var.ty.shape)
        if value.shape != expected:
            raise ModelFormatError(f"{name}: initializer '{init.name}' has shape {value.shape}, "
                                   f"its parameter {expected}")
        params[var.name] = np.ascontiguousarray(value)
        source_names[var.name] = init.name
    mod = _without_param_attrs(mod)
    inputs = [
        TensorSpec(v.name, tuple(int(d) for d in v.ty.shape), str(v.ty.dtype)) for v in main.params[:num_input]
    ]
    return Graph(mod=mod, params=params, inputs=inputs, source_names=source_names, source="onnx", name=name)


def _onnx_converters() -> dict:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return _get_convert_map()


def _constants_and_inputs_apart(proto, initializer_inputs: set[str], name: str):
    """A copy of ``proto`` where ``graph.input`` holds only real inputs and non-float
    initializers are Constant nodes.

    An old export lists its initializers among the inputs too; TVM's frontend then counts
    them twice (once as inputs, once as parameters) and the two lists no longer line up.
    Integer initializers are shapes and indices: ops such as ConstantOfShape and Reshape need
    them as constants, and they are never weights to squeeze.
    """
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    init_names = {init.name for init in graph.initializer}
    unknown = initializer_inputs - init_names
    if unknown:
        raise ModelFormatError(f"{name}: initializer_inputs {sorted(unknown)} name no initializer of the model")
    inputs = [inp for inp in graph.input if inp.name not in init_names or inp.name in initializer_inputs]
    del graph.input[:]
    graph.input.extend(inputs)

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    keep, constants = [], []
    for init in graph.initializer:
        if init.name in initializer_inputs:
            continue
        if init.data_type in float_types:
            keep.append(init)
        else:
            constants.append(helper.make_node("Constant", [], [init.name], name=f"{init.name}_constant", value=init))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _translate(proto, shape_dict: dict, dtype_dict: dict, name: str):
    """TVM's ONNX frontend, with an error in any node reported as NodeImportError naming it."""
    import contextlib
    import io
    import warnings

    from tvm.relax.frontend.onnx import onnx_frontend

    from lastbit.frontend.node_errors import close_block_builder, describe_tensor, node_import_error, tvm_error_summary

    class NodeNamingImporter(onnx_frontend.ONNXGraphImporter):
        def _convert_operator(self, op_name, inputs, attrs, opset):
            try:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            except Exception as err:  # noqa: BLE001 - any TVM failure becomes one line naming the node
                node = attrs.get("tvm_custom", {}).get("name", "")
                onnx_node = nodes_by_name.get(node)
                names = list(onnx_node.input) if onnx_node is not None else [f"input{i}" for i in range(len(inputs))]
                described = [describe_tensor(n, getattr(x, "ty", None)) if x is not None else f"{n} (absent)"
                             for n, x in zip(names, inputs)]
                raise node_import_error(op_name, node or "?", described, err) from err

    nodes_by_name = {node.name: node for node in proto.graph.node if node.name}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = NodeNamingImporter(shape_dict, dtype_dict, keep_params_in_input=True)
    # The frontend prints each failing operator to stdout; NodeImportError says it instead.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its input renaming notices; lastbit keeps the names it reports
        try:
            return importer.from_onnx(proto.graph, opset)
        except NodeImportError:
            close_block_builder(importer.bb)  # raised inside the function being built
            raise
        except Exception as err:  # noqa: BLE001
            if isinstance(err, LastbitError):
                raise
            raise ModelFormatError(f"{name}: TVM's ONNX frontend failed: {tvm_error_summary(err)}") from err


def _without_param_attrs(mod):
    """Drop the frontend's copy of the parameter values from ``main``'s attributes
    (lastbit keeps them in Graph.params; a second copy doubles the memory)."""
    from tvm import relax

    mod, _ = relax.frontend.detach_params(mod)
    return mod

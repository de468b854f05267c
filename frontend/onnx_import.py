"""Import an ONNX model (file path or ModelProto) into a lastbit Graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lastbit.errors import ModelFormatError, UnsupportedOpError
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


def from_onnx(model, name: str | None = None) -> Graph:
    """Translate an ONNX model with TVM's Relax ONNX frontend; initializers become named parameters."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    # Unknown ops first: the checker would reject them with a less useful message.
    proto = load_onnx(model, check=False)
    name = name or (Path(model).stem if not hasattr(model, "graph") else (proto.graph.name or "onnx_model"))
    supported = _get_convert_map()
    for node in proto.graph.node:
        if node.op_type not in supported and node.op_type not in ("Constant", "If"):
            raise UnsupportedOpError(node.op_type, node.name or node.output[0], "no Relax translation in TVM's ONNX frontend")
    _check_model(proto, str(model) if not hasattr(model, "graph") else "<ModelProto>")

    initializers = {init.name for init in proto.graph.initializer}
    shape_dict, dtype_dict = {}, {}
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            raise ModelFormatError(f"{name}: input '{inp.name}' has a dynamic shape {dims}; export with fixed shapes")
        shape_dict[inp.name] = dims
        dtype_dict[inp.name] = _ONNX_DTYPES.get(tt.elem_type, "float32")

    mod = relax_from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=True)
    mod, detached = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if "num_input" in main.attrs else len(shape_dict)
    param_vars = main.params[num_input:]
    values = detached.get("main", [])
    params: dict[str, np.ndarray] = {}
    source_names: dict[str, str] = {}
    # The frontend names a parameter after its initializer, less torch's "onnx::" prefix.
    original = {init.name.removeprefix("onnx::"): init.name for init in proto.graph.initializer}
    for var, value in zip(param_vars, values):
        params[var.name] = value.numpy()
        source_names[var.name] = original.get(var.name, var.name)
    inputs = [
        TensorSpec(v.name, tuple(int(d) for d in v.ty.shape), str(v.ty.dtype)) for v in main.params[:num_input]
    ]
    return Graph(mod=mod, params=params, inputs=inputs, source_names=source_names, source="onnx", name=name)

"""Turn an exception raised inside one of TVM's frontends into a one-line NodeImportError."""

from __future__ import annotations

import re

from lastbit.errors import NodeImportError

# TVM prints the whole operator object ("In ir.Op(span=None, ..., name="relax.nn.conv2d", ...
# support_level=10), layout ...") in front of its message; the op name is all a user needs.
_TVM_OP = re.compile(r'ir\.Op\(.*?name="([^"]+)".*?support_level=\d+\)')


def tvm_error_summary(err: BaseException, limit: int = 300) -> str:
    """The first meaningful line of a TVM error, with operator reprs shortened to their names."""
    text = _TVM_OP.sub(r"\1", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("File ")]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def tensor_label(name: str, dtype: object, dims: object = None) -> str:
    """``name dtype[d0,d1]`` (``[?]`` when the rank is unknown, ``name`` alone with no dtype):
    how every import error names an input."""
    if dtype is None:
        return name
    if dims is None:
        return f"{name} {dtype}[?]"
    return f"{name} {dtype}[{','.join(str(d) for d in dims)}]"


def describe_tensor(name: str, ty) -> str:
    """`tensor_label` from a Relax type."""
    dims = getattr(getattr(ty, "shape", None), "values", None)  # a ShapeExpr; None when the rank is unknown
    if dims is not None:
        dims = [int(d.value) if hasattr(d, "value") else d for d in dims]
    return tensor_label(name, getattr(ty, "dtype", None), dims)


def node_import_error(op: str, node: str, inputs: list[str], err: BaseException) -> NodeImportError:
    return NodeImportError(op, node, ", ".join(inputs), tvm_error_summary(err))


def close_block_builder(bb) -> None:
    """End the block and scope a frontend left open when one node's converter raised (call it
    only then: on a builder with no open block TVM crashes), so TVM does not print
    "BlockBuilder destroyed with remaining blocks" after lastbit's one-line error."""
    bb._end_block()
    bb.end_scope()

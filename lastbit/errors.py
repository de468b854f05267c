"""The errors lastbit raises: one type per kind of failure a user can act on."""


class LastbitError(Exception):
    """Base class of every error lastbit raises on bad input or a failed stage."""


class UnsupportedOpError(LastbitError):
    """A model uses an operator lastbit cannot import or lower; the message names it and the node."""

    def __init__(self, op: str, node: str = "", detail: str = ""):
        self.op, self.node = op, node
        where = f" at node '{node}'" if node else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"unsupported operator '{op}'{where}{extra}")


class ModelFormatError(LastbitError):
    """A model file is malformed, truncated or of an unknown kind; the message names the file."""


class UntrustedModelError(ModelFormatError):
    """A model file whose loader can run code (a pickled .pt2) was not marked trusted
    (``trust_pickle=True`` / ``--trust-pickle``)."""


class TargetError(LastbitError):
    """An unknown target triple, or a target whose toolchain or runner is missing."""


class ArtifactError(LastbitError):
    """A compiled artifact directory is missing files or does not match its manifest."""


class RunError(LastbitError):
    """Running compiled code failed (wrong inputs, a crashed runner, a failed emulator)."""


class NodeImportError(LastbitError):
    """TVM's ONNX or torch frontend failed on one node; the message names its op type, the
    node and its inputs (name, dtype, shape), so the input at fault can be seen in one line."""

    def __init__(self, op: str, node: str, inputs: str, detail: str):
        self.op, self.node, self.inputs, self.detail = op, node, inputs, detail
        super().__init__(f"cannot import {op} node '{node}' (inputs: {inputs or 'none'}): {detail}")

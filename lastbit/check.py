"""Check a compiled model against its source model on random input, and say when such a
check proves nothing (every output is the same constant, so any broken model would match)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

# Outputs whose values all lie within this of each other (relative to their magnitude, at
# least 1) carry no information a comparison could test.
DEGENERATE_TOL = 1e-6


@dataclass
class CheckResult:
    """One comparison of a compiled model with its source, on the same input."""

    reference: str  # what ran the source model: "onnxruntime" or "torch"
    max_rel_err: float  # max |compiled - reference| / max |reference|, over every output
    outputs: int
    degenerate: str | None  # why this check proves little, or None

    def format(self) -> str:
        line = (f"check vs {self.reference} on random input: max relative error {self.max_rel_err:.2g} "
                f"over {self.outputs} output(s)")
        return line + (f"\nwarning: {self.degenerate}" if self.degenerate else "")


def degenerate_reason(outputs: Sequence[np.ndarray], tol: float = DEGENERATE_TOL) -> str | None:
    """Why a comparison on these (reference) outputs proves little: every output of more than
    one value is constant within ``tol``. None when at least one output varies."""
    varied, constant = 0, []
    for i, out in enumerate(outputs):
        out = np.asarray(out, dtype=np.float64)
        if out.size <= 1:
            continue
        scale = max(1.0, float(np.abs(out).max()))
        if float(np.ptp(out)) <= tol * scale:
            constant.append(f"output {i} is {float(out.flat[0]):.6g} everywhere")
        else:
            varied += 1
    if varied or not constant:
        return None
    return f"{'; '.join(constant)} (all {sum(np.asarray(o).size for o in outputs)} values equal within {tol:g})"


def random_inputs(specs, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal float inputs (integer inputs: zeros) of the shapes in ``specs``."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        if np.issubdtype(np.dtype(spec.dtype), np.floating):
            arrays.append(rng.standard_normal(spec.shape).astype(spec.dtype))
        else:
            arrays.append(np.zeros(spec.shape, spec.dtype))
    return arrays


def check_against_source(artifact, model, inputs: Sequence[np.ndarray] | None = None, seed: int = 0) -> CheckResult:
    """Run ``artifact`` and its ``model`` (an .onnx path or ModelProto: onnxruntime; a torch
    module: torch) on the same ``inputs`` (default: random) and compare every output.

    A squeezed artifact differs from its float source by design; the error then measures the
    squeeze, not the compiler.  Logs a warning when the reference outputs are degenerate.
    """
    arrays = list(inputs) if inputs is not None else random_inputs(artifact.graph.inputs, seed)
    reference, expected = _reference_outputs(model, arrays)
    actual = artifact.run(*arrays)
    actual = actual if isinstance(actual, list) else [actual]
    if len(actual) != len(expected):
        raise LastbitError(f"the compiled model gives {len(actual)} output(s), {reference} {len(expected)}")
    scale = max(max((float(np.abs(e).max()) for e in expected if e.size), default=0.0), 1e-6)
    err = max((float(np.abs(np.asarray(a, np.float64) - e).max()) for a, e in zip(actual, expected) if e.size),
              default=0.0)
    degenerate = degenerate_reason(expected)
    if degenerate:
        degenerate = (f"{reference} {degenerate} on random input: the match checks nothing, a model printing "
                      f"that constant would pass too")
    result = CheckResult(reference, err / scale, len(expected), degenerate)
    if result.degenerate:
        log.warning("%s: %s", artifact.graph.name, result.degenerate)
    return result


def _reference_outputs(model, arrays: list[np.ndarray]) -> tuple[str, list[np.ndarray]]:
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".onnx" or type(model).__name__ == "ModelProto":
        import onnxruntime as ort

        source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, arrays))
        return "onnxruntime", [np.asarray(o, np.float64) for o in session.run(None, feeds)]
    import torch

    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            out = model(*[torch.from_numpy(a) for a in arrays])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return "torch", [o.detach().numpy().astype(np.float64) for o in outs]
    raise LastbitError(f"cannot run a {type(model).__name__} as a reference: check takes an .onnx model "
                       f"or a torch module")
